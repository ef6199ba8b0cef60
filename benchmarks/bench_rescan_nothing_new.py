"""A scan, then rescans that find nothing new, each in a fresh process as a user runs them: where the time
goes (import, open, scan, close). Usage: python benchmarks/bench_rescan_nothing_new.py DB_FOLDER PHOTO_FOLDER
(run it 3 times on the same folders: the first run is the first scan)."""

import sys
import time


def main():
    t0 = time.monotonic()
    from nanodb import NanoDB
    t1 = time.monotonic()
    db = NanoDB(sys.argv[1], config="test", autosave=True)
    t2 = time.monotonic()
    r = db.scan(sys.argv[2])
    t3 = time.monotonic()
    db.close()
    t4 = time.monotonic()
    print(f"import {t1-t0:.2f}s open {t2-t1:.2f}s scan-call {t3-t2:.2f}s close {t4-t3:.2f}s | {r.summary()}")


if __name__ == "__main__":
    main()
