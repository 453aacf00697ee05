"""Outgoing network: DNS resolvers and the TCP dialer (direct or through SOCKS5)."""
