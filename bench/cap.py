#!/usr/bin/env python3
"""Make a big GPU look like a smaller card: hold all of its free memory but LEFT GiB.

    python3 bench/cap.py 23.6 &     # then start the run; kill the holder afterwards

A process started after the holder prints `capped: ...` sees LEFT GiB free: its CUDA context, its
allocator's reserved pages and every tensor must fit in that, as on a 24 GB card (23.6 GiB is about
what an RTX 3090/4090 leaves a process). This is how "fits 24 GB" is checked on an 80 GB H100.
"""
import signal
import sys
import time


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    left = float(sys.argv[1]) * 2**30
    import torch

    free, total = torch.cuda.mem_get_info()
    if free <= left:
        sys.exit(f"cap.py: only {free / 2**30:.2f} GiB free, nothing to hold for a "
                 f"{left / 2**30:.2f} GiB card")
    held = torch.empty(int(free - left), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    print(f"capped: total {total / 2**30:.2f} GiB, held {held.numel() / 2**30:.2f} GiB, "
          f"free now {torch.cuda.mem_get_info()[0] / 2**30:.2f} GiB", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
