"""`medchain data`: simulate a data set to a file, and inspect any data source."""
from __future__ import annotations

import argparse
from pathlib import Path

_SOURCE_HELP = ("'simulated[:n=2000,sites=5,seed=0]', a MedMNIST flag (e.g. breastmnist, "
                "pneumoniamnist; downloaded once to the data cache, $MEDCHAIN_DATA or <repo>/data), "
                "a .npz file in the MedMNIST layout, or a folder with one sub-folder of images per "
                "class")


def register(sub) -> None:
    p = sub.add_parser("data", help="simulate, download and inspect data sets",
                       description="Simulate, download and inspect data sets.")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{simulate,info}")

    s = dsub.add_parser("simulate", help="generate the simulated chest-CT set into an .npz file",
                        description="Generate medchain's simulated chest-CT nodule data set and "
                                    "write it in the MedMNIST .npz layout (with *_site arrays).")
    s.add_argument("--n", type=int, default=10000, help="total images (default 10000)")
    s.add_argument("--sites", type=int, default=5, help="acquisition sites (default 5)")
    s.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    s.add_argument("--site-offset", type=int, default=0,
                   help="first site id (unseen sites for a transfer task; default 0)")
    s.add_argument("--size", type=int, default=28, help="image side in pixels (default 28)")
    s.add_argument("--out", type=Path, required=True, help="output file (.npz)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=run_simulate)

    i = dsub.add_parser("info", help="load a data source and print its counts",
                        description="Load a data source (downloading a MedMNIST set when needed) "
                                    "and print its split x class counts, shape and channels.")
    i.add_argument("source", help=_SOURCE_HELP)
    i.add_argument("--cache-dir", type=Path, default=None,
                   help="MedMNIST download cache (default $MEDCHAIN_DATA, else <repo>/data)")
    i.add_argument("--no-download", action="store_true",
                   help="fail instead of downloading a MedMNIST file missing from the cache")
    i.add_argument("--image-size", type=int, default=28,
                   help="side length image folders are resized to (default 28)")
    i.set_defaults(func=run_info)


def _print_summary(ds) -> None:
    from medchain.data import describe

    counts = describe(ds)
    total = counts[["train", "val", "test", "total"]].sum()
    print(f"name:       {ds.name}")
    print(f"source:     {ds.source}")
    print(f"images:     {len(ds.train)} train, {len(ds.val)} val, {len(ds.test)} test "
          f"({int(total['total'])} in all)")
    print(f"shape:      {'x'.join(str(d) for d in ds.image_shape)} uint8, "
          f"{ds.n_channels} channel{'s' if ds.n_channels != 1 else ''}")
    print(f"n_classes:  {ds.n_classes}")
    print()
    print(counts.to_string())
    if ds.train.site is not None and ds.val.site is not None and ds.test.site is not None:
        print()
        print(describe(ds, by="site").to_string())


def run_simulate(args: argparse.Namespace) -> int:
    from medchain.data import save_npz, simulate_ct

    ds = simulate_ct(n=args.n, sites=args.sites, seed=args.seed, size=args.size,
                     site_offset=args.site_offset, progress=not args.quiet)
    out = save_npz(ds, args.out)
    ds.source = str(out)
    print(f"wrote {out}")
    _print_summary(ds)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from medchain.data import load_dataset

    ds = load_dataset(args.source, cache_dir=args.cache_dir, download=not args.no_download,
                      image_size=args.image_size)
    _print_summary(ds)
    return 0
