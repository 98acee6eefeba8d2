"""Who replied: a site's name with its radfed and statistics-schema versions, and their checks."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict

from radfed import __version__
from radfed.federation.codes import InvalidReply
from radfed.federation.schema import SITE_KEY, STATS_SCHEMA_VERSION
from radfed.folders import POOLED_SITE

__all__ = ["SiteIdentity", "read_site_identity"]


@dataclass(frozen=True)
class SiteIdentity:
    """Who replied, with which radfed and statistics schema."""

    name: str
    radfed_version: str
    schema_version: int

    @classmethod
    def local(cls, name: str) -> SiteIdentity:
        return cls(name=name, radfed_version=__version__, schema_version=STATS_SCHEMA_VERSION)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "name": self.name,
                "radfed-version": self.radfed_version,
                "schema-version": self.schema_version,
            }
        )


def read_site_identity(content: RecordDict) -> SiteIdentity:
    """Read and check the identity of a reply.

    Raises:
        InvalidReply: no identity, the name reserved for pooled metrics, or a radfed/schema
            version this server cannot read.
    """
    record = content.config_records.get(SITE_KEY)
    if record is None:
        raise InvalidReply("reply carries no site identity (is the site running radfed?)")
    name = record.get("name")
    version = record.get("radfed-version")
    schema = record.get("schema-version")
    if (
        not isinstance(name, str)
        or not name
        or not isinstance(version, str)
        or not isinstance(schema, int)
    ):
        raise InvalidReply("reply carries a malformed site identity")
    if name == POOLED_SITE:
        msg = (
            f"site name {name!r} is reserved for the pooled metrics; "
            "give the site another name in its node config"
        )
        raise InvalidReply(msg)
    if schema != STATS_SCHEMA_VERSION:
        msg = (
            f"site {name!r} sends statistics schema {schema}, this server reads "
            f"{STATS_SCHEMA_VERSION}; install the same radfed version at site and server"
        )
        raise InvalidReply(msg)
    if _release(version) != _release(__version__):
        msg = (
            f"site {name!r} runs radfed {version}, the server {__version__}; "
            "install the same radfed release at site and server"
        )
        raise InvalidReply(msg)
    return SiteIdentity(name=name, radfed_version=version, schema_version=schema)


def _release(version: str) -> tuple[str, ...]:
    """The part of a version that must match: major, and minor while the major is 0."""
    parts = version.split(".")
    return tuple(parts[:2]) if parts[0] == "0" else tuple(parts[:1])
