"""Defences against probes and abuse: anti-replay cache, IP allow/block lists."""
