"""Build derived offline assets once at setup time and check the embedded ones are present."""

from __future__ import annotations

from mpt_utils.errors import cli_main


@cli_main
def main() -> None:
    from mpt_utils.data import _gensim_test_data
    from mpt_utils.models import DEFAULT_MODEL, embedded_path

    print(f"[assets] embedded model {DEFAULT_MODEL}: {embedded_path(DEFAULT_MODEL)}")
    print(f"[assets] embedded corpora: {_gensim_test_data()}")
    try:
        from mpt_utils.eval.offline_tasks import build_offline_tasks
    except ImportError:
        return
    print(f"[assets] offline lm-eval tasks: {build_offline_tasks()}")


if __name__ == "__main__":
    main()
