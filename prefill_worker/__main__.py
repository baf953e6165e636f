"""The prefill worker's frontend process (started by its engine core's process, worker/host.py)."""

from prefill_worker.app import create_app
from worker.frontend import run

if __name__ == "__main__":
    run(create_app)
