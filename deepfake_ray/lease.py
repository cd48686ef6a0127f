"""A lock for an S3 work directory: S3 has no lock the OS frees when a process dies.

The lock is an object, `<uri>/.lock`, created only if absent (a conditional write,
`If-None-Match: *`) and renewed every RENEW_S seconds while its run lives (`If-Match`
its own ETag, so a run that lost it notices) and deleted at the end only if still its
own (`If-Match` again: a run whose renewals failed must not free its successor's lock).
A lock not renewed for LAPSE_S seconds belongs to a run that died: the next run takes it
over, again conditionally, so of two runs taking over at once only one succeeds. A run on
a Ray cluster also records its Ray job: a run on the same cluster takes over at once from
a driver that Ray reports dead (a job killed outright renews nothing, and its resubmission
would otherwise wait LAPSE_S), and a run on a cluster waits out (rather than refuses) a
lock held from another cluster, which may be gone with its driver (a RayJob's retry). Its age
is measured on the store's clock, not the writers' (machines' clocks may disagree). Each
run's lock carries a token of its own, so a write whose reply was lost and then retried
(and refused, as the object changed) is recognized as its own. Stores without
conditional writes get a warning and no lock.
"""
from __future__ import annotations

import contextlib
import email.utils
import json
import os
import secrets
import signal
import socket
import threading
import time

from deepfake_ray import s3, storage
from deepfake_ray.errors import LockHeld, UsageError, warn

LOCK = ".lock"
RENEW_S = 60.0
LAPSE_S = 300.0  # five missed renewals: the holder is gone
# Unrenewed this long (the machine slept, or could not reach the store), a run stops before
# another may take its lock over: it would go on writing beside the new holder until its
# next renewal found the lock taken.
STALE_S = LAPSE_S - 2 * RENEW_S
CHECK_S = 5.0  # how soon after waking the renewer looks at its clock
RENEWED: dict[str, list[float]] = {}  # lock's folder -> when its last renewal was sent (awake_s)
# sent by this process to its own main thread only (unused by Ray's driver)
TAKEN_OVER = signal.SIGUSR2
LOCKS_TAKEN_OVER: list[tuple] = []  # (folder, why) set by a renewer before it signals, read by the handler


def awake_s() -> float:
    """A clock that counts the time a machine was suspended (time.monotonic does not, on
    Linux), as the store's clock, which decides the lapse, does."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


def check_fresh(uri: str) -> None:
    """UsageError when a lock this process holds over `uri` has gone unrenewed for STALE_S:
    a stage's commit (its marker) waits for no renewer to notice. A woken laptop's main
    thread runs on at once."""
    uri = storage.normalize(uri)
    for folder, renewed in list(RENEWED.items()):
        if (uri == folder or uri.startswith(folder + "/")) and awake_s() - renewed[0] > STALE_S:
            raise UsageError(stale_message(folder, awake_s() - renewed[0]))


def stale_message(folder: str, unrenewed: float) -> str:
    return (f"the lock of {folder} went unrenewed for {unrenewed:.0f} s (this machine slept, or could "
            f"not reach the store), and another run may take a lock after {LAPSE_S:.0f} s: this run "
            "stops before two write there; run it again (a training resumes from its last checkpoint)")


def holder(command: str, token: str) -> bytes:
    return json.dumps({"command": command, "host": socket.gethostname(), "pid": os.getpid(),
                       "renewed": time.time(), "token": token, **ray_job(), **processes()}).encode()


def processes() -> dict:
    """Which processes a pid names here: this boot of this machine's kernel (a host name
    can repeat across machines) and this pid namespace (containers on one machine share
    its boot, not their pids). Empty where the OS does not say (not Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return {"processes": f"{f.read().strip()} {os.readlink('/proc/self/ns/pid')}"}
    except OSError:
        return {}


def dead_here(info: dict) -> bool:
    """Whether the lock's holder, a driver that ran on no Ray cluster, ran among this
    process's processes and is gone (kill -9): its lock otherwise waited out the lease. A
    cluster's driver is Ray's to declare dead (holder_ended): its workers may still be
    writing. A pid alive (or reused since) proves nothing; the host name must match too
    (machines restored from one snapshot share a boot id)."""
    pid, here = info.get("pid"), processes().get("processes")
    if (info.get("ray_job") or not here or info.get("processes") != here
            or info.get("host") != socket.gethostname() or type(pid) is not int or pid <= 0):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # another user's (it exists), or no pid this OS has
        return False
    return False


def connected_cluster() -> str | None:
    """The Ray cluster this process is connected to, if any: its GCS address and the
    session of this start of it. The address alone can repeat (a cluster restarted at one
    head address numbers its jobs from 1 again; two container heads both 172.17.0.2:6379),
    and its job table would then speak for another cluster's driver."""
    import ray

    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    return f"{context.gcs_address} {context.get_session_name()}"


def our_cluster() -> str | None:
    """The cluster this driver joined; None for the in-process Ray, which ends with this
    process: no later run could ask it about this one."""
    from deepfake_ray import runtime

    return None if runtime.in_process() else connected_cluster()


def ray_job() -> dict:
    """This driver's Ray job and cluster, when it is connected to a cluster."""
    import ray

    cluster = our_cluster()
    return {"ray_job": ray.get_runtime_context().get_job_id(), "ray_cluster": cluster} if cluster else {}


def holder_ended(info: dict) -> bool | None:
    """Whether the lock's holder, a driver on the Ray cluster this process is connected to,
    has ended (True) or lives (False); None when this process cannot tell."""
    if not info.get("ray_job") or info.get("ray_cluster") != connected_cluster():
        return None
    try:  # GCS's job table: Ray 2.60 (pinned) has no public call for a driver's liveness
        from ray._private.state import jobs

        dead = [bool(job["IsDead"]) for job in jobs() if job.get("JobID") == info["ray_job"]]
    except Exception:  # noqa: BLE001 - cannot tell: the lapse decides, as without Ray
        return None
    return dead[0] if dead else None


def lock_info(current: dict) -> dict:
    """What a lock object says about its holder ({} for one this code did not write); read
    once per reply, as its body is a stream."""
    if "info" not in current:
        try:
            info = json.loads(current["Body"].read())
        except ValueError:
            info = {}
        current["info"] = info if isinstance(info, dict) else {}
    return current["info"]


def idle_s(current: dict, info: dict) -> float:
    """Seconds since the lock was last written, on the store's clock: the reply's Date
    less the object's LastModified."""
    try:
        now = email.utils.parsedate_to_datetime(current["ResponseMetadata"]["HTTPHeaders"]["date"])
        return (now - current["LastModified"]).total_seconds()
    except (KeyError, TypeError, ValueError):  # a store that sends no Date: the writer's clock
        try:
            return time.time() - float(info["renewed"])
        except (KeyError, TypeError, ValueError):
            return float("inf")  # not a lock we wrote: nobody renews it


def error_code(e: Exception) -> str:
    return getattr(e, "response", {}).get("Error", {}).get("Code", "")


@contextlib.contextmanager
def held(uri: str, command: str):
    """Holds `<uri>/.lock` on S3, or fails with UsageError while a live run does; a lock a
    run on another Ray cluster holds is waited on until it lapses (`take`, up to LAPSE_S)."""
    client, bucket, prefix = s3.s3_client(uri, quick=True)
    key = f"{prefix}/{LOCK}" if prefix else LOCK
    token = secrets.token_hex(8)
    with s3.store_errors(storage.join(uri, LOCK)):  # an unreachable store: one line, no password
        etag = take(client, bucket, key, uri, command, token)
    renewed = [awake_s()]  # once taken: take may wait out another cluster's lock for minutes
    if etag is None:  # a store without conditional writes
        yield
        return
    held_etag, stop, lost = [etag], threading.Event(), threading.Event()
    RENEWED[storage.normalize(uri)] = renewed
    with stops_when_taken_over(uri) as stop_run:
        renewer = threading.Thread(target=renew_until_stopped, daemon=True, args=(
            client, bucket, key, held_etag, command, token, stop, lost, stop_run, renewed))
        renewer.start()
        try:
            yield
        finally:  # the takeover's stop may land in join (SIGUSR2): forget the lease first
            RENEWED.pop(storage.normalize(uri), None)
            stop.set()
            try:
                renewer.join()
            finally:
                if not lost.is_set():  # a stale lock may still be this run's: freed if so (If-Match)
                    release(client, bucket, key, held_etag[0], command)


@contextlib.contextmanager
def stops_when_taken_over(uri: str):
    """Yields what the renewing thread calls once another run took the lock over: the run
    then stops (UsageError in its main thread), as two writers would mix their files. Off
    the main thread (no handler can be set there) it yields None, and the run only warns."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return

    def taken_over(signum, frame):
        # the lock named by the renewer that signalled: a run holding two (prepare: the work
        # directory's, then data/'s) has the inner one's handler in place for both
        which, why = LOCKS_TAKEN_OVER.pop() if LOCKS_TAKEN_OVER else (uri, None)
        raise UsageError(why or f"another run took over the lock of {which} (a run may take a lock not "
                         f"renewed for {LAPSE_S:.0f} s, as when this one was stalled or cut off from "
                         "the store): this run stops, so that only one writes there; run it again "
                         "once that one has ended")

    def stop_run(why: str | None = None):
        LOCKS_TAKEN_OVER.append((uri, why))
        signal.pthread_kill(main, TAKEN_OVER)

    previous = signal.signal(TAKEN_OVER, taken_over)
    main = threading.main_thread().ident
    try:  # a real signal, to the main thread only: it also wakes a wait (a sleep, a socket)
        yield stop_run
    finally:
        signal.signal(TAKEN_OVER, previous)


def release(client, bucket: str, key: str, etag: str, command: str) -> None:
    """Deletes the lock if it is still the one this run wrote, never another run's. A store
    that fails to answer does not fail a run that is over: the lock lapses instead."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        deleted = delete_if_unchanged(client, bucket, key, etag)
    except (BotoCoreError, ClientError) as e:
        warn(f"{command}: warning: could not delete the lock s3://{bucket}/{key} ({s3.redacted(str(e))}): the next "
             f"run may wait up to {LAPSE_S:.0f} s for it")
        return
    if not deleted and held_by_another(client, bucket, key, etag):  # gone: our delete's reply was lost
        warn(f"{command}: warning: another run took over the lock s3://{bucket}/{key} "
             "before this one ended: two runs may have written there")


def held_by_another(client, bucket: str, key: str, etag: str) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)["ETag"] != etag
    except (BotoCoreError, ClientError):
        return False


def delete_if_unchanged(client, bucket: str, key: str, etag: str) -> bool:
    """True once deleted; False when the object is gone or no longer `etag`."""
    from botocore.exceptions import ClientError

    gone = ("PreconditionFailed", "NoSuchKey", "404")
    try:
        client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        return True
    except ClientError as e:
        if error_code(e) in gone:
            return False
        if error_code(e) != "NotImplemented":
            raise
    try:  # a store without conditional deletes: compare, then delete (a narrow race)
        unchanged = client.head_object(Bucket=bucket, Key=key)["ETag"] == etag
    except ClientError as e:
        if error_code(e) in gone:
            return False
        raise
    if unchanged:
        client.delete_object(Bucket=bucket, Key=key)
    return unchanged


def take(client, bucket: str, key: str, uri: str, command: str, token: str) -> str | None:
    """The ETag of the lock this run now holds (None: the store cannot lock)."""
    from botocore.exceptions import ClientError

    no_lock = (f"{command}: warning: this S3 store has no conditional writes, so {uri} has no "
               "lock: keep runs that share it apart yourself")
    for _ in range(3):  # the holder may end between our two requests
        try:
            etag = client.put_object(Bucket=bucket, Key=key, Body=holder(command, token),
                                     IfNoneMatch="*")["ETag"]
            try:
                ignored = ignores_conditions(client, bucket, key, command, token)
            except BaseException:  # no renewer will free it: the next run would wait it out
                with contextlib.suppress(Exception):
                    delete_if_unchanged(client, bucket, key, etag)
                raise
            if ignored:
                warn(no_lock)
                return None
            return etag
        except ClientError as e:
            if error_code(e) == "NotImplemented":
                warn(no_lock)
                return None
            if error_code(e) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
        try:
            current = client.get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if error_code(e) == "NoSuchKey":
                continue
            raise
        if holder_elsewhere(lock_info(current)) and not dead_here(lock_info(current)):
            current = wait_for_lapse(client, bucket, key, uri, command, current)
            if current is None:  # its holder ended and deleted it: take it anew
                continue
        return take_over(client, bucket, key, uri, command, token, current)
    raise LockHeld(f"other runs keep taking {uri}'s lock: wait for them to end, or use another --workdir",
                   f"{command} run")


def ignores_conditions(client, bucket: str, key: str, command: str, token: str) -> bool:
    """Whether the store took a conditional create of an object that exists: one that
    ignores If-None-Match (AWS S3 before August 2024, older MinIO and Ceph) lets a second
    run write over the lock, and neither would know. Such a lock is deleted: it locks nothing."""
    from botocore.exceptions import ClientError

    try:
        client.put_object(Bucket=bucket, Key=key, Body=holder(command, token), IfNoneMatch="*")
    except ClientError as e:
        if error_code(e) in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
    client.delete_object(Bucket=bucket, Key=key)
    return True


def holder_elsewhere(info: dict) -> bool:
    """Whether this run is on a Ray cluster and the lock's holder ran on another: a KubeRay
    RayJob retries on a new cluster, and the old one, its driver with it, may be gone."""
    ours = our_cluster()
    return ours is not None and bool(info.get("ray_cluster")) and info["ray_cluster"] != ours


WAIT_POLL_S = 10.0


def wait_for_lapse(client, bucket: str, key: str, uri: str, command: str, current: dict) -> dict | None:
    """The lock once it has lapsed, or as soon as its holder renews it (then it lives, and
    take_over refuses); None when its holder deletes it. A retried job waits out its own
    dead attempt's lock instead of failing the retry at once."""
    from botocore.exceptions import ClientError

    info = lock_info(current)
    left = LAPSE_S - idle_s(current, info)
    if left > 0:
        print(f"{command}: {uri} is locked by {info.get('command', 'a run')} on another Ray cluster "
              f"({info.get('host')}), last renewed {idle_s(current, info):.0f} s ago: waiting up to "
              f"{left:.0f} s for it to lapse, as a run that died stops renewing it", flush=True)
    while idle_s(current, info) < LAPSE_S:
        time.sleep(min(WAIT_POLL_S, max(0.1, LAPSE_S - idle_s(current, info))))
        try:
            latest = client.get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if error_code(e) == "NoSuchKey":
                return None
            raise
        if latest["ETag"] != current["ETag"]:
            return latest  # renewed: it lives
        current = latest
    return current


def take_over(client, bucket: str, key: str, uri: str, command: str, token: str, current: dict) -> str:
    """A dead run's lock, unless its holder lives or another run takes it first (or it is
    this run's own: its write went through, the reply was lost, the retry was refused)."""
    from botocore.exceptions import BotoCoreError, ClientError

    info = lock_info(current)
    if info.get("token") == token:
        return current["ETag"]
    refuse_if_live(current, info, uri, command, deciding=True)
    try:
        return client.put_object(Bucket=bucket, Key=key, Body=holder(command, token),
                                 IfMatch=current["ETag"])["ETag"]
    except ClientError as e:
        if error_code(e) not in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
            raise
        try:
            own = own_etag(client, bucket, key, token)
        except (BotoCoreError, ClientError) as unread:  # not knowing is not losing: the store's
            raise s3.store_error(uri, unread) from unread
        if own is not None:
            return own  # this write went through; its reply was lost, and the retry refused
        raise LockHeld(f"another {command} took over {uri}'s lock just now: wait for it to end, "
                       "or use another --workdir", command) from None


def refuse_if_live(current: dict, info: dict, uri: str, command: str, deciding: bool) -> bool:
    """UsageError while the lock's holder lives; True when it is gone. Before this process
    joins Ray (`deciding` False: a check, not the taking) a holder that ran on a Ray cluster
    gets the benefit of the doubt (False): the run decides when it takes the lock, knowing
    whether Ray saw it die."""
    if idle_s(current, info) >= LAPSE_S or dead_here(info):
        return True
    ended = holder_ended(info)
    if ended:
        return True
    if ended is None and not deciding and info.get("ray_job"):
        return False
    job = f", Ray job {info['ray_job']}" if info.get("ray_job") else ""
    holder = f"{info.get('command', command)} (pid {info.get('pid')} on {info.get('host')}{job})"
    # a job submitted twice is the common case: the first still runs (Ctrl-C only detaches)
    stop = " (`ray job list` on its cluster names it, `ray job stop` ends it)" if job else ""
    raise LockHeld(f"another {holder} is writing {uri}: wait for it to end{stop}, or use another --workdir "
                   f"(a run that died elsewhere frees it {LAPSE_S:.0f} s after its last sign of life)", holder)


def check_free(uri: str, command: str) -> bool:
    """UsageError while a live run holds `<uri>/.lock`; takes nothing. False when only a
    run on the holder's Ray cluster can tell whether it lives. A store that cannot answer
    (no such bucket, refused credentials) passes: the write that follows says what is
    wrong in the words every S3 failure gets, and `held` takes the lock itself."""
    from botocore.exceptions import BotoCoreError, ClientError

    client, bucket, prefix = s3.s3_client(uri)
    try:
        current = client.get_object(Bucket=bucket, Key=f"{prefix}/{LOCK}" if prefix else LOCK)
    except (BotoCoreError, ClientError):
        return True
    return refuse_if_live(current, lock_info(current), uri, command, deciding=False)


def renew_until_stopped(client, bucket: str, key: str, etag: list[str], command: str, token: str,
                        stop: threading.Event, lost: threading.Event, stop_run=None,
                        renewed: list[float] | None = None) -> None:
    """The renewer thread's life: renews the lock every RENEW_S seconds until `stop`; `etag[0]` follows the lock this run holds, and
    `renewed[0]` when its last renewal was sent. Taken over by another run, or unrenewed for
    STALE_S, it calls `stop_run` (if any)."""
    from botocore.exceptions import BotoCoreError, ClientError

    renewed = renewed if renewed is not None else [awake_s()]
    tried, said_stale = renewed[0], False
    while not stop.wait(min(CHECK_S, RENEW_S)):
        if (unrenewed := awake_s() - renewed[0]) > STALE_S and not said_stale:
            folder = f"s3://{bucket}/{key.removesuffix(LOCK).rstrip('/')}"
            if stop_run:
                warn(f"{command}: warning: {stale_message(folder, unrenewed)}")
                stop_run(stale_message(folder, unrenewed))
                return
            said_stale = True  # off the main thread nothing can stop the run: renewing goes on
            warn(f"{command}: warning: the lock {folder} went unrenewed for {unrenewed:.0f} s: another "
                 "run may take it over")
        if awake_s() - tried < RENEW_S:
            continue
        tried = awake_s()
        try:
            etag[0] = client.put_object(Bucket=bucket, Key=key, Body=holder(command, token),
                                        IfMatch=etag[0])["ETag"]
            renewed[0], said_stale = tried, False
        except (BotoCoreError, ClientError) as e:  # the run goes on; say what may follow
            if error_code(e) in ("PreconditionFailed", "NoSuchKey"):
                try:
                    own = own_etag(client, bucket, key, token)
                except (BotoCoreError, ClientError) as unread:  # not knowing is not losing
                    warn(f"{command}: warning: could not read the lock s3://{bucket}/{key} ({s3.redacted(str(unread))}); "
                         "trying again")
                    continue
                if own is not None:
                    etag[0] = own  # this renewal's write went through; its reply was lost
                    renewed[0] = tried
                    continue
                lost.set()
                warn(f"{command}: warning: another run took over the lock s3://{bucket}/{key}: "
                     + ("this run stops" if stop_run else "two runs may now be writing there"))
                if stop_run:
                    stop_run()
                return
            warn(f"{command}: warning: could not renew the lock s3://{bucket}/{key} ({s3.redacted(str(e))}); another "
                 f"run may take it over {LAPSE_S:.0f} s after the last renewal")


def own_etag(client, bucket: str, key: str, token: str) -> str | None:
    """The lock's ETag if it is still this run's (by its token); None when it is another's
    or gone. A read that fails raises: a blip after a renewal whose reply was lost must
    not read as a takeover (the run would stop, its lock left behind)."""
    from botocore.exceptions import ClientError

    try:
        current = client.get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if error_code(e) == "NoSuchKey":
            return None
        raise
    return current["ETag"] if lock_info(current).get("token") == token else None
