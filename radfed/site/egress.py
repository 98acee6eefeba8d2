"""What leaves a site, and only that: every reply passes the site policy's size limit and is
recorded in the site's audit log first; a failure leaves as an error code, never as text."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Error, Message

from radfed.config import RunConfig
from radfed.errors import ConfigError, DataError, RadfedError
from radfed.federation.codes import ErrorCode
from radfed.federation.schema import ARRAYS_KEY, CONFIG_KEY
from radfed.flower_private import log_like_flower, serialize_content
from radfed.log import logger
from radfed.privacy import AuditLog, LimitExceeded, PolicyRefusal, Request
from radfed.site.bundle import BundleIdentity, BundleRefused, check_bundle
from radfed.site.node import resolve_site, server_round, site_policy

__all__ = ["HeldOut", "guarded"]


class HeldOut(RadfedError):
    """This site is the run's held-out site; it does not train."""


Handler = Callable[[Message, Context], Message]

#: The code of each radfed error a handler may raise, most specific first.
_CODES: tuple[tuple[type[RadfedError], ErrorCode], ...] = (
    (HeldOut, ErrorCode.HELD_OUT),
    (BundleRefused, ErrorCode.BUNDLE),
    (LimitExceeded, ErrorCode.LIMIT),
    (PolicyRefusal, ErrorCode.POLICY),
    (ConfigError, ErrorCode.CONFIG),
    (DataError, ErrorCode.DATA),
)


def guarded(handler: Handler, bundle: BundleIdentity | None = None) -> Handler:
    """Reply with an error code, never exception text; log locally without values or paths.

    With ``bundle`` (a deployed site: the run's app bundle), the site policy must accept it
    before the handler runs. Every reply passes the site policy's size limit and is recorded
    in the site's audit log before it leaves.
    """
    kind = handler.__name__.strip("_")

    def run(msg: Message, context: Context) -> Message:
        log_like_flower()
        reply = _reply_or_code(handler, msg, context, bundle)
        return _leave(reply, msg, context, kind, bundle)

    return run


def _reply_or_code(
    handler: Handler, msg: Message, context: Context, bundle: BundleIdentity | None
) -> Message:
    try:
        if bundle is not None:
            path = resolve_site(context.node_config, _folder_settings(context))[1]
            check_bundle(site_policy(context.node_config, path).bundle, bundle)
        return handler(msg, context)
    except RadfedError as err:
        # radfed's own messages name manifest lines and settings, never header values.
        log = logger.info if isinstance(err, HeldOut) else logger.error
        log("%s failed: %s", handler.__name__.strip("_"), err)
        code = next((c for kind, c in _CODES if isinstance(err, kind)), ErrorCode.RADFED)
    except Exception as err:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        logger.error(
            "%s failed: %s at %s:%d (message withheld)",
            handler.__name__.strip("_"),
            type(err).__name__,
            Path(frame.filename).name,
            frame.lineno or 0,
        )
        code = ErrorCode.UNEXPECTED
    return _error(code, msg)


def _error(code: int, msg: Message) -> Message:
    return Message(error=Error(code=code, reason=f"radfed site error {code}"), reply_to=msg)


def _folder_settings(context: Context) -> RunConfig:
    """The run settings that name this node's site folder, even when others are invalid: an
    error reply about a bad setting is audited like any other."""
    try:
        return RunConfig.from_run_config(context.run_config)
    except ConfigError:
        return RunConfig(data_root=str(context.run_config.get("data-root", "")))


def _request(msg: Message, context: Context, bundle: BundleIdentity | None) -> Request:
    """What ``msg`` asked for, as the audit log records it."""
    arrays = msg.content.array_records.get(ARRAYS_KEY)
    config = msg.content.config_records.get(CONFIG_KEY)
    return Request.describe(
        msg.metadata.message_type,
        context.run_config,
        bundle_sha256=None if bundle is None else bundle.sha256,
        arrays=arrays,
        message_config=dict(config.items()) if config is not None else {},
    )


#: The round the audit log records for a message whose ``server-round`` is not a round.
INVALID_ROUND = -1


def _round_or_invalid(msg: Message) -> int:
    """The message's round (0 without a config), or ``INVALID_ROUND``: a refusal of a
    message with a bad round is audited all the same."""
    if msg.content.config_records.get(CONFIG_KEY) is None:
        return 0
    try:
        return server_round(msg)
    except (ConfigError, OverflowError, ValueError):
        return INVALID_ROUND


def _leave(
    reply: Message, msg: Message, context: Context, kind: str, bundle: BundleIdentity | None
) -> Message:
    """Enforce the policy's message size and write the audit entry of ``reply``, with the
    request it answers.

    A reply the audit log cannot record does not leave: an error code goes instead.
    """
    try:
        path = resolve_site(context.node_config, _folder_settings(context))[1]
        policy = site_policy(context.node_config, path)
    except RadfedError:
        return reply  # an error reply for a node without a site folder: nothing to audit in
    payload = None
    if not reply.has_error():
        payload = serialize_content(reply.content)  # once: its size and its audit digest
        try:
            policy.check_size(len(payload))
        except PolicyRefusal as err:
            logger.error("%s reply withheld: %s", kind, err)
            reply = _error(ErrorCode.POLICY, msg)
    try:
        audit = AuditLog.for_site(path)
        round_ = _round_or_invalid(msg)
        request = _request(msg, context, bundle)
        if reply.has_error():
            audit.record(
                None,
                run_id=msg.metadata.run_id,
                server_round=round_,
                kind="error",
                error_code=reply.error.code,
                request=request,
            )
        else:
            audit.record(
                reply.content,
                run_id=msg.metadata.run_id,
                server_round=round_,
                kind=kind,
                request=request,
                payload=payload,
            )
    except Exception as err:  # an unrecorded reply must not leave the site
        logger.error(
            "%s reply withheld: the audit log cannot record it (%s)", kind, type(err).__name__
        )
        return _error(ErrorCode.RADFED, msg)
    return reply
