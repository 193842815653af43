"""Train one trial of any registered method without Ray:

    python -m trainables METHOD --epochs 2 --data-dir DATA_DIR --set key=value ...
"""
import sys

from trainables import engine, registry

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit(f"usage: python -m trainables METHOD [options]; METHOD is one of "
                         f"{', '.join(registry.names())}")
    try:
        method_cls = registry.get(sys.argv[1])
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    engine.main(method_cls, sys.argv[2:])
