"""mtgworkers: a Telegram MTProto proxy (FakeTLS, domain fronting) compatible with mtg v2."""

__version__ = "0.1.0"
