"""The one exception type that means "the user asked for something we cannot do", and
how to find one (or an S3 failure the user can fix) behind the errors Ray wraps it in."""


class UsageError(Exception):
    """Bad usage or bad input. The CLI prints the message as one line and exits 2.

    The message must say what is wrong and how to fix it.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM (`ray job stop`, `timeout`, a container's stop), stopping a command as Ctrl-C does."""


def raise_terminated(*_) -> None:
    raise Terminated


def find_usage_error(e: BaseException) -> UsageError | str | None:
    """A UsageError, or an S3 failure the user can fix, behind `e`: raised inside a Ray
    task, it arrives wrapped."""
    from deepfake_ray import storage

    return find_error(e, lambda f: f if isinstance(f, UsageError) else storage.explain(f))


def find_error(e: BaseException, match):
    """The first truthy `match(f)` over `e` and the errors behind it, as Ray wraps them."""
    seen, pending = set(), [e]
    while pending:
        e = pending.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if found := match(e):
            return found
        cause = getattr(e, "cause", None)
        pending.append(cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__))
        # Ray Train's errors hold the workers' (by rank) or its controller's, not as a cause
        pending += [f for f in (getattr(e, "worker_failures", None) or {}).values()
                    if isinstance(f, BaseException)]
        pending.append(getattr(e, "controller_failure", None))
    return None
