"""Measurements of features that land during the day, each as a ratio within one run:
`--workers`, a repository of ten policies against one, a reload under load, and the decision
log. A feature is measured once `policy-server serve --help` lists its flag; until then its
row says it is not available."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from harness import OUT, PYTHON, Load, Server, Target, ours, parse_wrk, wrk, wrk_command

from protocols import measure_protocols

ADMIN_KEY = "bench-admin-key"


class ServeFlags:
    """The flags `policy-server serve --help` lists."""

    def __init__(self) -> None:
        self.text = subprocess.run(
            [PYTHON, "-m", "policy_server.hosting.cli", "serve", "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def __contains__(self, flag: str) -> bool:
        return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", self.text) is not None

    def switch(self, flag: str) -> list[str]:
        """A boolean flag as the command line takes it: alone, or with a value."""
        takes_value = re.search(rf"{re.escape(flag)} [A-Z_]+", self.text) is not None
        return [flag, "true"] if takes_value else [flag]


def not_available(flag: str) -> str:
    return f"not available: `policy-server serve` has no {flag} yet"


def measure_c32(server: Server, target: Target, duration: int, path: str = "/predict") -> Load:
    try:
        server.start()
        server.warm_up()
        return wrk(server.url + path, target.observation, target.key, 32, duration)
    finally:
        server.stop()


def measure_workers(
    target: Target, cache: Path, duration: int, counts: tuple[int, ...], flags: ServeFlags
) -> dict[str, Any]:
    if "--workers" not in flags:
        return {"notes": {"workers": not_available("--workers")}}
    figures: dict[str, Any] = {"notes": {}}
    for count in counts:
        server = ours(target, cache, "--workers", str(count))
        figures[f"workers_{count}"] = measure_c32(server, target, duration)
    return figures


def build_repository(target: Target, count: int) -> Path:
    """REPO/<name>_NN/ with the target's schema.yaml and saved_model.zip, `count` times."""
    repository = OUT / f"repository-{count}"
    shutil.rmtree(repository, ignore_errors=True)
    for index in range(count):
        add_policy(target, repository, index)
    return repository


def add_policy(target: Target, repository: Path, index: int) -> None:
    folder = repository / f"{policy_stem(target)}_{index:02d}"
    folder.mkdir(parents=True)
    for name in ("schema.yaml", "saved_model.zip"):
        shutil.copyfile(target.path / name, folder / name)


def policy_stem(target: Target) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", target.path.name)


def predict_route(url: str, name: str) -> str:
    """The typed /predict route of the policy `name`, read from the server's OpenAPI."""
    paths = httpx.get(url + "/openapi.json", timeout=10).json()["paths"]
    posts = [path.strip("/").split("/") for path, ops in paths.items() if "post" in ops]
    for parts in posts:
        if parts[-1] == "predict" and name in parts:
            return "/" + "/".join(parts)
    for parts in posts:
        if parts[-1] == "predict" and any(part.startswith("{") for part in parts):
            return "/" + "/".join(name if part.startswith("{") else part for part in parts)
    return "/predict"


def ready_route(server: Server, target: Target, name: str, timeout: float = 180) -> str:
    """The policy's /predict route once it answers 200: a repository may still be loading
    its policies when `GET /` first answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            route = predict_route(server.url, name)
            response = httpx.post(
                server.url + route,
                json=target.observation,
                headers={"access-token": target.key},
                timeout=10,
            )
            if response.status_code == 200:
                return route
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"policy {name} did not answer 200 within {timeout:.0f} s")


def repository_server(target: Target, cache: Path, repository: Path, *flags: str) -> Server:
    policies = dataclasses.replace(target, path=repository)
    return ours(policies, cache, *flags, probe=("/", None, target.key))


def measure_repository(
    target: Target, cache: Path, duration: int, flags: ServeFlags
) -> dict[str, Any]:
    """/predict of one policy with ten policies loaded against one, then a reload under load."""
    figures: dict[str, Any] = {"notes": {}}
    name = f"{policy_stem(target)}_00"
    admin = ["--admin-key", ADMIN_KEY] if "--admin-key" in flags else []
    for count in (1, 10):
        repository = build_repository(target, count)
        server = repository_server(target, cache, repository, *admin)
        try:
            server.start()
            route = ready_route(server, target, name)
            server.warm_up(route, target.observation)
            figures["repository_route"] = route
            load = wrk(server.url + route, target.observation, target.key, 32, duration)
            if load.errors:
                figures["notes"]["repository"] = f"{load.errors} errors on {route}"
            figures[f"repository_{count}"] = load
            if count == 10:
                if admin:
                    figures |= measure_reload(server, route, target, repository, duration)
                else:
                    figures["notes"]["reload"] = not_available("--admin-key")
        except RuntimeError as error:
            figures["notes"]["repository"] = f"not available: {error}"
            return figures
        finally:
            server.stop()
    return figures


def measure_reload(
    server: Server, route: str, target: Target, repository: Path, duration: int
) -> dict[str, Any]:
    """wrk at 32 connections; halfway, one policy is added, another removed, and
    `POST /admin/reload` is sent."""
    command = wrk_command(server.url + route, target.observation, target.key, 32, duration)
    load = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    time.sleep(duration / 2)
    add_policy(target, repository, 10)
    shutil.rmtree(repository / f"{policy_stem(target)}_09")
    status, took = post_reload(server)
    output, _ = load.communicate(timeout=duration + 120)
    return {"reload": parse_wrk(output), "reload_status": status, "reload_s": took}


def post_reload(server: Server) -> tuple[str, float]:
    """`POST /admin/reload`: its status and body (or why it failed), and how long it took."""
    started = time.perf_counter()
    try:
        response = httpx.post(
            server.url + "/admin/reload", headers={"access-token": ADMIN_KEY}, timeout=120
        )
        status = f"{response.status_code} {response.text[:160]}"
    except httpx.HTTPError as error:
        status = f"failed: {error!r}"
    return status, time.perf_counter() - started


def measure_decision_log(
    target: Target, cache: Path, duration: int, flags: ServeFlags
) -> dict[str, Any]:
    if "--decision-log" not in flags:
        return {"notes": {"decision_log": not_available("--decision-log")}}
    figures: dict[str, Any] = {"notes": {}}
    folder = OUT / "decisions"
    variants: dict[str, list[str]] = {
        "decision_log_off": [],
        "decision_log": ["--decision-log", str(folder)],
    }
    if "--decision-log-sync" in flags:
        variants["decision_log_sync"] = [
            "--decision-log",
            str(folder),
            *flags.switch("--decision-log-sync"),
        ]
    else:
        figures["notes"]["decision_log_sync"] = not_available("--decision-log-sync")
    for name, extra in variants.items():
        shutil.rmtree(folder, ignore_errors=True)
        try:
            figures[name] = measure_c32(ours(target, cache, *extra), target, duration)
        except RuntimeError as error:
            figures["notes"][name] = f"not measured: {error}"
            continue
        if extra:
            written = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            figures[f"{name}_bytes"] = written
    return figures


def measure_rollout(
    target: Target, cache: Path, duration: int, flags: ServeFlags
) -> dict[str, Any]:
    from rollout import measure_rollout as measure  # it imports this module's helpers

    return measure(target, cache, duration, flags)


def measure_features(target: Target, cache: Path, duration: int) -> dict[str, Any]:
    flags = ServeFlags()
    figures: dict[str, Any] = {"notes": {}}
    for part in (
        measure_workers(target, cache, duration, (1, 2), flags),
        measure_repository(target, cache, duration, flags),
        measure_decision_log(target, cache, duration, flags),
        measure_rollout(target, cache, duration, flags),
        measure_protocols(target, cache, duration),
    ):
        notes = part.pop("notes")
        figures |= part
        figures["notes"] |= notes
    return figures
