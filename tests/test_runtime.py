import os

SETTINGS = ("RAY_API_SERVER_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")


def settings_in_a_task(ray):
    @ray.remote(num_cpus=1)
    def settings():
        return {name: os.environ.get(name) for name in SETTINGS}
    return ray.get(settings.remote())


def test_in_process_ray_passes_its_settings_to_its_processes_only(ray_session):
    """Workers learn where the dashboard's state API is (pointed at a stale cluster, Ray
    Train stalled 12 s per run), that nothing can be preempted and that Train's controller
    may poll its local workers often; this process, and whatever it starts later (a
    `ray start` cluster, a job), keeps its own environment."""
    seen = settings_in_a_task(ray_session)
    assert (seen["RAY_API_SERVER_ADDRESS"] or "").startswith("http://127.0.0.1:"), seen
    assert seen["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert seen["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert not any(name in os.environ for name in SETTINGS)
