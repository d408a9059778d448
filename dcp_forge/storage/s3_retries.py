"""Retries for both S3 clients: every request gets the whole budget, however long the process has run.

The budget is ``max_attempts`` per request (the first included). Both SDKs' "standard" retry modes
also keep a retry quota per client: a token bucket of 500, 5 tokens (14 in botocore's newer mode) a
retry, one token back per successful request. A long outage empties it in about 100 retries, and
then every request of the client fails at its first error until hundreds of successes have refilled
it: after a 100-second outage, 4-second blips that the budget covers fail in under a second. Our
clients live as long as the process (the Arrow client is shared, s3fs instances are cached), so the
bucket would carry one outage's damage into every later save. Neither SDK lets the quota be switched
off, so:

- Arrow gets ``AwsDefaultS3RetryStrategy``, which keeps no state across requests: the same retryable
  errors as the standard strategy, its backoff 0, 50 ms, 100 ms, ... doubling without jitter or cap.
  The cap is ours: a data client is Arrow only for budgets up to ``ARROW_MAX_ATTEMPTS``.
- s3fs's botocore client gets ``PerRequestRetries`` ahead of its own retry handler: botocore's
  standard decision (retryable error, attempts left) and its capped, jittered backoff, without the
  quota. botocore's handler still runs after it; on a request ours retries, its answer is not used.
"""

from __future__ import annotations

from typing import Any

import s3fs

# With the default strategy's doubling from 50 ms, 12 attempts wait at most 25.6 s before the last
# one (51 s in all), near botocore's 20-second cap per wait; more would mean minutes-long waits.
ARROW_MAX_ATTEMPTS = 12
_HANDLER_ID = "dcp-forge-per-request-retries"


def arrow_retry_strategy(max_attempts: int) -> Any:
    """Arrow's stateless retry strategy for ``max_attempts`` attempts in total per request."""
    import pyarrow.fs as pafs

    if not 1 <= max_attempts <= ARROW_MAX_ATTEMPTS:
        raise ValueError(f"Arrow's S3 client takes 1 to {ARROW_MAX_ATTEMPTS} attempts per request "
                         f"(got {max_attempts}): its backoff doubles without a cap")
    # Arrow passes the number to the SDK's DefaultRetryStrategy, which counts retries, not attempts.
    return pafs.AwsDefaultS3RetryStrategy(max_attempts=max_attempts - 1)


class PerRequestRetries:
    """botocore's standard retry rule applied to each request on its own (no client-wide quota).

    A ``needs-retry`` handler (botocore's event API): returns the delay before the next attempt, or
    None when the error is not retryable or the request has used ``max_attempts``.
    """

    def __init__(self, max_attempts: int) -> None:
        from aiobotocore.retries.standard import AioRetryPolicy, AioStandardRetryConditions
        from botocore.retries.standard import ExponentialBackoff, RetryEventAdapter

        self.max_attempts = max_attempts
        self._policy = AioRetryPolicy(retry_checker=AioStandardRetryConditions(max_attempts=max_attempts),
                                      retry_backoff=ExponentialBackoff())
        self._events = RetryEventAdapter()

    async def needs_retry(self, **kwargs: Any) -> float | None:
        context = self._events.create_retry_context(**kwargs)
        if await self._policy.should_retry(context):
            return self._policy.compute_retry_delay(context)
        return None


class RetryingS3FileSystem(s3fs.S3FileSystem):
    """``s3fs.S3FileSystem`` whose client retries every request on its own budget (``PerRequestRetries``).

    Only in botocore's "standard" retry mode, the one we configure by default: "legacy" mode has no
    quota, and "adaptive" mode's client-side rate limiting is a choice the user made knowingly.
    """

    async def set_session(self, refresh: bool = False, kwargs: dict | None = None) -> Any:
        client = await super().set_session(refresh, kwargs or {})
        retries = (self.config_kwargs or {}).get("retries") or {}
        if retries.get("mode") == "standard":
            handler = self.__dict__.get("_per_request_retries")
            if handler is None:
                attempts = int(retries.get("total_max_attempts", int(retries.get("max_attempts", 2)) + 1))
                handler = self.__dict__["_per_request_retries"] = PerRequestRetries(attempts)
            # register_first: asked before botocore's own handler. The id makes registering again (every
            # call of set_session) a no-op, while a new client (after a refresh) gets it too.
            client.meta.events.register_first("needs-retry.s3", handler.needs_retry, unique_id=_HANDLER_ID)
        return client
