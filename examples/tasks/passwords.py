"""Find which candidate passwords match a set of hashes, in batches over the fabric:
``fabric up``, then ``python examples/tasks/passwords.py``.

The candidates are every string over ``--alphabet`` of 1 to ``--max-len`` characters,
numbered in order (shortest first): a task gets a range of numbers, makes those
candidates itself (nothing but the range travels) and hashes each with the algorithms the
targets use (SHA-256 and SHA-512, hashlib), returning the matches.  The batches run as one
``fc.map`` under a progress bar (``fc.progress``).

Targets come from ``--targets FILE`` (one a line: ``sha256:<hex>``, ``sha512:<hex>``, or a
bare hex digest, its algorithm told by its length), or else from a demo: a few passwords
drawn from the candidates plus one longer than ``--max-len`` (which must not be found).
bcrypt targets (``bcrypt:$2b$...``; the demo adds two) are tried against the first
``--bcrypt-limit`` candidates only, bcrypt being slow by design, and only when the
``bcrypt`` package is installed (skipped with a message otherwise).

The check: each password found hashes to its target here, and in the demo every drawn
password is found and the longer one is not.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fabric import FabricClient

DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
#: hex digest length -> algorithm, for bare digests in a targets file
BY_LENGTH = {64: "sha256", 128: "sha512"}


def space_size(alphabet: str, max_len: int) -> int:
    return sum(len(alphabet) ** n for n in range(1, max_len + 1))


def candidates(alphabet: str, max_len: int, start: int, stop: int) -> list[str]:
    """Candidates number *start* to *stop* - 1: the strings of length 1, then 2, ... each in
    ``itertools.product`` order."""
    out: list[str] = []
    first = 0  # the number of the first candidate of the current length
    for length in range(1, max_len + 1):
        count = len(alphabet) ** length
        lo, hi = max(start - first, 0), min(stop - first, count)
        if lo < hi:
            out.extend("".join(t) for t in itertools.islice(itertools.product(alphabet, repeat=length), lo, hi))
        first += count
        if first >= stop:
            break
    return out


def crack(start: int, stop: int, alphabet: str, max_len: int, targets: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(target, password)`` for each candidate in the range whose hash is a target (runs on a node).
    *targets* maps ``sha256``/``sha512`` to hex digests; a target reads ``<algorithm>:<hex>``."""
    found = []
    wanted = {algo: {bytes.fromhex(h) for h in digests} for algo, digests in targets.items() if digests}
    for pw in candidates(alphabet, max_len, start, stop):
        data = pw.encode()
        for algo, digests in wanted.items():
            digest = hashlib.new(algo, data).digest()
            if digest in digests:
                found.append((f"{algo}:{digest.hex()}", pw))
    return found


def crack_bcrypt(words: list[str], targets: list[str]) -> list[tuple[str, str]]:
    """``(target, password)`` for each word that matches a bcrypt target (runs on a node)."""
    import bcrypt

    return [(t, w) for w in words for t in targets if bcrypt.checkpw(w.encode(), t.encode())]


def verify(target: str, password: str) -> bool:
    """Whether *password* hashes to *target*, checked here."""
    algo, _, value = target.partition(":")
    if algo == "bcrypt":
        import bcrypt

        return bool(bcrypt.checkpw(password.encode(), value.encode()))
    return hashlib.new(algo, password.encode()).hexdigest() == value


def read_targets(path: Path) -> list[str]:
    """``<algorithm>:<value>`` of each non-empty line of *path* (a bare hex digest by its length)."""
    out = []
    for line in path.read_text().split("\n"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        algo, sep, value = line.partition(":")
        if not sep:
            algo, value = BY_LENGTH.get(len(line), ""), line
        if algo == "bcrypt":
            out.append(f"bcrypt:{value}")
        elif algo in ("sha256", "sha512") and len(value) == 2 * hashlib.new(algo).digest_size:
            out.append(f"{algo}:{value.lower()}")
        else:
            raise SystemExit(f"{path}: cannot read target {line!r} (sha256:<hex>, sha512:<hex> or bcrypt:<hash>)")
    return out


def demo_targets(alphabet: str, max_len: int, bcrypt_limit: int, seed: int, have_bcrypt: bool) \
        -> tuple[list[str], dict[str, str | None]]:
    """Targets for a demo, and what each must be found as (None: must not be found)."""
    rng = random.Random(seed)
    size = space_size(alphabet, max_len)
    picks = [candidates(alphabet, max_len, i, i + 1)[0] for i in rng.sample(range(size), min(3, size))]
    picks.append(alphabet[0] * (max_len + 1))  # outside the candidates
    expect: dict[str, str | None] = {}
    for n, pw in enumerate(picks):
        algo = ("sha256", "sha512")[n % 2]
        expect[f"{algo}:{hashlib.new(algo, pw.encode()).hexdigest()}"] = pw if len(pw) <= max_len else None
    if have_bcrypt and bcrypt_limit > 0:
        import bcrypt

        limit = min(bcrypt_limit, size)
        for i in rng.sample(range(limit), min(2, limit)):
            pw = candidates(alphabet, max_len, i, i + 1)[0]
            expect["bcrypt:" + bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()] = pw
    return list(expect), expect


def run_batches(fc: FabricClient, fn: Any, calls: Sequence[tuple[Any, ...]], description: str) -> list[tuple[str, str]]:
    futures = fc.map(fn, *zip(*calls, strict=True))
    with fc.progress(futures, description=description):
        batches = fc.gather(futures)
    return [hit for batch in batches for hit in batch]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nats-url", default=None, help="NATS URL (default: $FABRIC_NATS_URL or fabric up's)")
    p.add_argument("--alphabet", default=DEFAULT_ALPHABET)
    p.add_argument("--max-len", type=int, default=4)
    p.add_argument("--batch", type=int, default=50_000, help="candidates per task")
    p.add_argument("--targets", type=Path, default=None, help="hashes to find, one a line (default: a demo)")
    p.add_argument("--bcrypt-limit", type=int, default=300, help="bcrypt targets: try this many first candidates")
    p.add_argument("--seed", type=int, default=None, help="the demo's draw (default: random)")
    p.add_argument("--out", type=Path, default=None, help="write {target: password} found here (JSON)")
    args = p.parse_args(argv)
    alphabet = "".join(dict.fromkeys(args.alphabet))  # a repeated letter would repeat candidates
    if not alphabet or args.max_len < 1 or args.batch < 1:
        p.error("the alphabet must not be empty; max-len and batch must be positive")
    try:
        import bcrypt  # noqa: F401 - only whether it is there
        have_bcrypt = True
    except ImportError:
        have_bcrypt = False

    size = space_size(alphabet, args.max_len)
    expect: dict[str, str | None] | None = None
    if args.targets is not None:
        targets = read_targets(args.targets)
    else:
        seed = random.randrange(1 << 30) if args.seed is None else args.seed
        targets, expect = demo_targets(alphabet, args.max_len, args.bcrypt_limit, seed, have_bcrypt)
    fast: dict[str, set[str]] = {"sha256": set(), "sha512": set()}
    slow: list[str] = []
    for t in targets:
        algo, _, value = t.partition(":")
        if algo == "bcrypt":
            slow.append(value)
        else:
            fast[algo].add(value)
    print(f"{size} candidates ({len(alphabet)} characters, up to {args.max_len}), "
          f"{sum(map(len, fast.values()))} SHA-2 targets, {len(slow)} bcrypt targets")

    found: dict[str, str] = {}
    with FabricClient(args.nats_url) as fc:
        calls = [(start, min(start + args.batch, size), alphabet, args.max_len, fast)
                 for start in range(0, size, args.batch)]
        found.update(run_batches(fc, crack, calls, f"sha-2, {len(calls)} batches"))
        if not have_bcrypt and (slow or expect is not None):
            what = f"its {len(slow)} targets" if slow else "the demo's"
            print(f"bcrypt is not installed here: skipping the bcrypt part ({what}; pip install bcrypt)")
        elif slow:
            limit = min(args.bcrypt_limit, size)
            words = candidates(alphabet, args.max_len, 0, limit)
            per_task = 50  # a bcrypt check takes milliseconds: small batches spread better
            slow_calls = [(words[i:i + per_task], slow) for i in range(0, limit, per_task)]
            hits = run_batches(fc, crack_bcrypt, slow_calls, f"bcrypt, {len(slow_calls)} batches")
            found.update((f"bcrypt:{t}", pw) for t, pw in hits)

    failed = False
    for target in targets:
        pw = found.get(target)
        shown = target if len(target) <= 40 else target[:37] + "..."
        print(f"{shown:40}  {'found: ' + repr(pw) if pw is not None else 'not found'}")
        if pw is not None and not verify(target, pw):
            print(f"MISMATCH: {pw!r} does not hash to {target}")
            failed = True
    if expect is not None:
        for target, pw in expect.items():
            if target.startswith("bcrypt:") and not have_bcrypt:
                continue
            if found.get(target) != pw:
                print(f"MISMATCH: {target} should be {'found as ' + repr(pw) if pw else 'not found'}, "
                      f"got {found.get(target)!r}")
                failed = True
    if not failed:
        print(f"check: {len(found)} of {len(targets)} targets found, each verified here")
    if args.out is not None:
        args.out.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
