"""Safe rollouts on one machine: rollback, traffic splits, promotion, labels, retention.

Every operation takes the deployment's lock, makes the worker serve the new plan first
(``Deployments.apply``), and only then records it in SQLite, so the split and labels
survive any restart exactly as they were last confirmed.
"""

from __future__ import annotations

import logging
import re
import shutil

from mserve.daemon import state as st
from mserve.daemon.deployments import Deployments
from mserve.daemon.plan import Plan
from mserve.daemon.errors import BadRequest, Conflict, MserveError, NotFound

log = logging.getLogger("mserve.daemon")
LABEL = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
SERVABLE = (st.ACTIVE, st.CANARY, st.STANDBY, st.RETIRED)


class Rollouts:
    def __init__(self, deployments: Deployments):
        self.d = deployments

    def _servable(self, name: str, number: int) -> dict:
        v = self.d.state.version(name, number)
        if v is None:
            raise NotFound(f"version {number} of '{name}' not found")
        if v["state"] not in SERVABLE:
            raise Conflict(f"version {number} of '{name}' is {v['state']}; it cannot serve")
        return v

    async def rollback(self, name: str, to: int | None) -> dict:
        async with self.d._locks[name]:
            d = self.d.get(name)
            current = d["active_version"]
            if d["traffic"] and to is None:  # during a canary: all traffic back to stable
                await self.d.apply(d, Plan(current, None, d["labels"], self.d._standby(d)))
                await self.d.record_or_revert(name, lambda: self.d.state.record_traffic(
                    name, None, "rollback", f"canary stopped; all traffic to version {current}"))
                log.info("rollback %s: canary stopped, all traffic to version %s", name,
                         current)
                return {"changed": True, "name": name, "version": current, "previous": current,
                        "canary_stopped": True, "deployment": self.d.describe(self.d.get(name))}
            target = self._rollback_target(d, to)
            if target["number"] == current and not d["traffic"]:
                return {"changed": False, "name": name, "version": current,
                        "deployment": self.d.describe(d)}
            await self.d.apply(d, Plan(target["number"], None, d["labels"], current))
            await self.d.record_or_revert(
                name, lambda: self.d.state.record_activate(name, target["number"]))
            log.info("rollback %s: version %s active (was %s)", name, target["number"], current)
            return {"changed": True, "name": name, "version": target["number"],
                    "previous": current, "deployment": self.d.describe(self.d.get(name))}

    def _rollback_target(self, d: dict, to: int | None) -> dict:
        name, current = d["name"], d["active_version"]
        if to is not None:
            target = self.d.state.version(name, to)
            if target is None:
                raise NotFound(f"version {to} of '{name}' not found")
            if target["state"] in (st.FAILED, st.PRUNED):
                raise Conflict(f"version {to} of '{name}' is {target['state']}; it cannot be "
                               "made active")
            return target
        # the previous active version: the standby (kept loaded, so a reference swap) ...
        versions = self.d.state.versions(name)
        standby = next((v for v in versions if v["state"] == st.STANDBY), None)
        if standby is not None and standby["number"] != current:
            return standby
        # ... or, with none (a standby pruned or failed), the newest servable one before it
        older = [v for v in versions
                 if v["number"] < current and v["state"] not in (st.FAILED, st.PRUNED)]
        if not older:
            raise Conflict(f"'{name}' has no previous version to roll back to")
        return older[-1]

    async def traffic(self, name: str, split: dict | None, sticky: str | None) -> dict:
        """Show (split None) or set the split of unpinned traffic, e.g. {3: 90, 4: 10}."""
        async with self.d._locks[name]:
            d = self.d.get(name)
            if split is None and sticky is None:
                return await self.show(d)
            split = _check_split(split) if split is not None else d["traffic"]
            for number in split or {}:
                self._servable(name, number)
            if split and set(split) == {d["active_version"]}:
                split = None  # 100% to the active version is no split
            if sticky is not None:
                d = {**d, "options": {**d["options"], "sticky_header": sticky or None}}
            await self.d.apply(d, Plan(d["active_version"], split, d["labels"],
                                       self.d._standby(d)))
            options = d["options"]

            def record() -> None:
                self.d.state.record_options(name, options)
                self.d.state.record_traffic(name, split, "traffic")

            await self.d.record_or_revert(name, record)
            log.info("traffic %s: %s%s", name, st.split_text(split),
                     f", sticky by {sticky}" if sticky else "")
            return await self.show(self.d.get(name))

    async def show(self, d: dict) -> dict:
        live = await self.d.live(d["name"]) or {}
        per_version = live.get("versions", {})
        split = d["traffic"] or {d["active_version"]: 100}
        return {"name": d["name"], "active": d["active_version"],
                "sticky_header": d["options"].get("sticky_header"),
                "split": [{"version": v, "percent": w, **per_version.get(str(v), {})}
                          for v, w in sorted(split.items())]}

    async def promote(self, name: str, number: int | None) -> dict:
        """Send all unpinned traffic to ``number`` (default: the canary) and make it active."""
        async with self.d._locks[name]:
            d = self.d.get(name)
            if number is None:
                canaries = [v for v in (d["traffic"] or {}) if v != d["active_version"]]
                if not canaries:
                    raise Conflict(f"'{name}' has no canary to promote; name a version")
                number = max(canaries)
            self._servable(name, number)
            previous = d["active_version"]
            if number == previous:
                if not d["traffic"]:  # already active with all traffic: nothing to do
                    return {"changed": False, "name": name, "version": number,
                            "previous": previous, "deployment": self.d.describe(d)}
                # already active, with a split: all traffic back to it, standby kept
                await self.d.apply(d, Plan(number, None, d["labels"], self.d._standby(d)))
                await self.d.record_or_revert(name, lambda: self.d.state.record_traffic(
                    name, None, "promote", f"all traffic to version {number}"))
                log.info("promote %s: all traffic to version %s (already active)", name, number)
            else:
                await self.d.apply(d, Plan(number, None, d["labels"], previous))
                await self.d.record_or_revert(name, lambda: self.d.state.record_activate(
                    name, number, action="promote"))
                log.info("promote %s: version %s active (was %s)", name, number, previous)
            return {"changed": True, "name": name, "version": number, "previous": previous,
                    "deployment": self.d.describe(self.d.get(name))}

    async def label(self, name: str, label: str, number: int | None) -> dict:
        """Point ``label`` at version ``number`` (None removes it)."""
        if not LABEL.fullmatch(label):
            raise BadRequest(f"invalid label {label!r}: use a-z, 0-9, '_', '.', '-', starting "
                             "with a letter")
        async with self.d._locks[name]:
            d = self.d.get(name)
            labels = dict(d["labels"])
            if number is None:
                if labels.pop(label, None) is None:
                    raise NotFound(f"label '{label}' of '{name}' not found")
                detail = f"{label} removed"
            else:
                self._servable(name, number)
                labels[label] = number
                detail = f"{label} -> {number}"
            await self.d.apply(d, Plan(d["active_version"], d["traffic"], labels,
                                       self.d._standby(d)))
            await self.d.record_or_revert(
                name, lambda: self.d.state.record_labels(name, labels, detail))
            log.info("label %s: %s", name, detail)
            return {"name": name, "labels": labels}

    def retain(self, name: str) -> list[int]:
        """Prune the oldest unprotected versions' artifacts beyond the deployment's ``keep``;
        the pruned version numbers."""
        d = self.d.get(name)
        keep = int(d["options"].get("keep") or 5)
        versions = self.d.state.versions(name)
        protected = {d["active_version"], *(d["traffic"] or {}), *d["labels"].values(),
                     self.d._standby(d)}
        on_disk = [v for v in versions if v["state"] != st.PRUNED]
        excess = len(on_disk) - keep
        doomed = [v["number"] for v in on_disk if v["number"] not in protected][:max(0, excess)]
        if doomed:
            self.d.state.record_pruned(name, doomed)
            try:
                self.prune()
            except MserveError as exc:  # the deploy succeeded; the files go at a later prune
                log.warning("retention of %s: versions %s marked pruned, files kept: %s", name,
                            doomed, exc.message)
        return doomed

    def prune(self) -> dict:
        """Delete store blobs that no version (other than pruned ones) refers to; nothing
        when the state looks damaged (it would refer to nothing)."""
        from mserve.daemon.statecheck import StateDamaged, prune_refusal

        if why := prune_refusal(self.d.state, self.d.store.root):
            log.warning("%s", why)
            raise StateDamaged(why)
        referenced = self.d.state.referenced_blobs()
        freed, removed = 0, []
        root = self.d.store.root
        for entry in (root.iterdir() if root.is_dir() else []):
            if entry.name.startswith(".") or entry.name in referenced \
                    or entry.name in self.d.ingesting:
                continue
            freed += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        return {"removed": removed, "freed_bytes": freed}


def _check_split(split: dict) -> dict[int, int]:
    try:
        clean = {int(v): w for v, w in split.items()}
    except (TypeError, ValueError):
        raise BadRequest("traffic: use VERSION=PERCENT pairs, e.g. 3=90 4=10") from None
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in clean.values()):
        raise BadRequest("traffic: percentages must be whole numbers from 0 to 100")
    if sum(clean.values()) != 100:
        raise BadRequest(f"traffic: percentages must add up to 100, not {sum(clean.values())}")
    return {v: w for v, w in clean.items() if w > 0}
