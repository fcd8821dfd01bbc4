"""parley: the asyncio application (conversation core, service, control socket)."""
