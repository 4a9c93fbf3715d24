"""``make run``: the whole product on one machine.

Uses DATABASE_URL/REDIS_URL when set; otherwise starts embedded PostgreSQL and Redis under
``.data/development`` (kept between runs), migrates, seeds the demo organization, prints the
console URL and login, and runs the Procfile's web, worker and scheduler through honcho.
Servers this run started are stopped when it exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from whistle_web.config import PROJECT_ROOT

PROCESSES = ("web", "worker", "scheduler")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(*, port: int = 5000) -> int:
    # Explicit handlers: a shell may start us with SIGINT ignored (background jobs).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    env = dict(os.environ)
    env.setdefault("WHISTLE_ENV", "development")
    services = None
    if not (env.get("DATABASE_URL") and env.get("REDIS_URL")):
        from whistle_web.embedded import EmbeddedServices

        data_dir = Path(env.get("WHISTLE_DATA_DIR") or PROJECT_ROOT / ".data") / env["WHISTLE_ENV"]
        services = EmbeddedServices(data_dir)
        print(f"Starting embedded PostgreSQL and Redis in {data_dir} ...", flush=True)
        urls = services.start()
        env.setdefault("DATABASE_URL", urls.database)
        env.setdefault("REDIS_URL", urls.redis)

    bin_dir = Path(sys.executable).parent
    whistle = str(bin_dir / "whistle")
    try:
        subprocess.run([whistle, "db", "upgrade"], env=env, check=True, cwd=PROJECT_ROOT)
        subprocess.run([whistle, "demo"], env=env, check=True, cwd=PROJECT_ROOT)
        base_url = f"http://127.0.0.1:{port}"
        from whistle_web.demo import DEMO_EMAIL, DEMO_PASSWORD

        print(
            "\n"
            f"  Whistle console:  {base_url}/login\n"
            f"  Demo login:       {DEMO_EMAIL} / {DEMO_PASSWORD}\n"
            f"  API health:       {base_url}/api/v1/health\n"
            "  Stop with Ctrl-C.\n",
            flush=True,
        )
        env["PORT"] = str(port)
        env.setdefault("WHISTLE_BIND_HOST", "127.0.0.1")
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        honcho = subprocess.Popen(
            [str(bin_dir / "honcho"), "start", "-f", "Procfile", "-p", str(port), *PROCESSES],
            env=env,
            cwd=PROJECT_ROOT,
        )
        try:
            return honcho.wait()
        except KeyboardInterrupt:
            # honcho passes SIGTERM on to web, worker and scheduler and waits for them.
            honcho.send_signal(signal.SIGTERM)
            try:
                honcho.wait(timeout=30)
            except subprocess.TimeoutExpired:
                honcho.kill()
                honcho.wait()
            return 0  # a requested stop is a clean exit
    except subprocess.CalledProcessError as error:
        print(f"Setup step failed: {' '.join(map(str, error.cmd))}", file=sys.stderr)
        return error.returncode or 1
    finally:
        if services is not None:
            print("Stopping embedded PostgreSQL and Redis ...", flush=True)
            services.stop(only_started=True)
