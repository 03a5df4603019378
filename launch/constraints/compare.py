"""`pip freeze` (stdin) against a constraints file: one line naming the JAX stack's versions and every package
whose version differs from the lock (tests/run_all.sh with CLINKD_NEWEST=1)."""

import sys

KEY = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "libtpu", "torch")


def pins(lines):
    out = {}
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            out[name.lower().replace("_", "-")] = version
    return out


def main():
    now, locked = pins(sys.stdin), pins(open(sys.argv[1]))
    key = ", ".join(f"{k} {now[k]}" for k in KEY if k in now)
    moved = [f"{k} {locked.get(k, 'new')} -> {v}" for k, v in sorted(now.items()) if locked.get(k) != v]
    gone = [f"{k} {v} -> none" for k, v in sorted(locked.items()) if k not in now]
    diff = moved + gone
    print(f"{key}; {len(diff)} differ from the lock" + (": " + ", ".join(diff) if diff else ""))


if __name__ == "__main__":
    main()
