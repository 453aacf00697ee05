"""Pure wire formats: no sockets, no event loop, no clock reads."""
