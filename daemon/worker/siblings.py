"""The other worker processes of this deployment (``--workers N``), as this one sees them.

Any process may answer a scrape or a statistics request (they share the port), so each
answers its siblings' questions on its own private socket (peers.PeerServer) and, to answer
a client, asks them all and merges what they say with its own figures (merge.py): a scrape
does not depend on which process it reaches. A sibling that does not answer within
``ASK_TIMEOUT_S`` (one being restarted) is left out of that answer. With one process there
are no siblings and nothing is asked.

The daemon sends the sockets and the deployment's secret at start and with every
``activate`` (a deployment that grows or shrinks tells the processes it keeps).
"""

from __future__ import annotations

import asyncio
import logging

from mserve.daemon.worker import merge, peers

log = logging.getLogger("mserve.worker")
ASK_TIMEOUT_S = 2.0


class Siblings:
    def __init__(self, serving, replica: int = 0):
        self.serving, self.replica = serving, replica
        self.others: list[str] = []
        self._own: str | None = None
        self._secret: str | None = None
        self._server: peers.PeerServer | None = None

    async def configure(self, sockets: list[str], secret: str | None) -> None:
        """Listen on this process's socket of ``sockets`` (one per process, in order) and
        ask the others from now on; none when the deployment runs one process."""
        own = sockets[self.replica] if len(sockets) > 1 and secret else None
        if (own, secret) != (self._own, self._secret):
            self.close()
            if own is not None:
                server = peers.PeerServer(own, secret, self.snapshot)
                await server.start()
                self._server = server
            self._own, self._secret = own, secret
        self.others = [path for i, path in enumerate(sockets)
                       if i != self.replica] if own is not None else []

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def snapshot(self) -> dict:
        """What a sibling asks for: this process's own figures."""
        return {"metrics": self.serving.metrics.render().decode(),
                "statistics": self.serving.statistics(None)}

    async def _ask(self) -> list[dict]:
        if not self.others:
            return []
        return await peers.gather(self.others, self._secret, ASK_TIMEOUT_S)

    async def metrics(self) -> bytes:
        """The exposition of ``GET /metrics`` for the whole deployment."""
        own = self.serving.metrics.render()
        theirs = await self._ask()
        if not theirs:
            return own
        texts = [own.decode()] + [s["metrics"] for s in theirs if isinstance(s.get("metrics"), str)]
        return (await asyncio.to_thread(merge.merge_exposition, texts)).encode()

    async def statistics(self, version: int | None) -> list[dict]:
        """Triton's ``model_stats`` for the whole deployment (one version, or all)."""
        own = self.serving.statistics(version)
        theirs = await self._ask()
        if not theirs:
            return own
        docs = [own] + [s["statistics"] for s in theirs if isinstance(s.get("statistics"), list)]
        merged = merge.merge_statistics(docs)
        if version is not None:
            merged = [doc for doc in merged if doc.get("version") == str(version)]
        return merged
