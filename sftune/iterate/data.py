"""Write the iterate examples' data: `python -m sftune.iterate.data {list,json_list,arithmetic,small_arithmetic} DIR [N_TRAIN N_TEST]`."""

from __future__ import annotations

import sys

from .. import tasks


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in ("list", "json_list", "arithmetic", "small_arithmetic"):
        raise SystemExit(__doc__)
    n_train, n_test = (int(argv[2]), int(argv[3])) if len(argv) >= 4 else (600, 100)
    if argv[0] == "list":
        paths = tasks.write_task_jsonl(argv[1], n_train=n_train, n_test=n_test, seed=0)
    elif argv[0] == "json_list":
        paths = tasks.write_json_list_jsonl(argv[1], n_train=n_train, n_test=n_test, seed=0)
    else:
        small = argv[0] == "small_arithmetic"
        paths = tasks.write_arithmetic_jsonl(argv[1], n_train=n_train, n_test=n_test, seed=0, small=small)
    print(*paths)


if __name__ == "__main__":
    main()
