"""How long a large collection on object storage takes to list and count before training: img2dataset's layout
(10,000 shards of 1,000 samples, a ``_stats.json`` beside each) against S3 (moto in server mode on 127.0.0.1),
and the same without any index (tar headers counted by Ray tasks).

    python benchmarks/data/source_listing.py                   # 10,000 shards with stats; 200 without an index
    python benchmarks/data/source_listing.py --shards 2000 --bare 100 --json out.json

Part 1, with stats files: the bucket gets ``--shards`` shard objects ``{00000..N}.tar`` and, beside each,
``NNNNN_stats.json`` (``successes: 1000``) and ``NNNNN.parquet``, as img2dataset writes them. Timed:
:func:`pipeline.data.resolve_source` of ``s3://bench/laion`` (one listing of the prefix, every stats file
read, 32 at a time, and the first sample of the first shard peeked at) - what ``jobs/pretrain.py`` does
before Ray starts. The shard objects are small real tars (one sample each): this path never opens any
shard but the first, so their size does not matter here.

Part 2, no index: ``--bare`` real shards of 1,000 samples each (tiny members: a tar of ~1 MB) counted from
their tar headers by :func:`pipeline.data.count_on_ray` on a local Ray (tasks of 8 shards, each shard
streamed once). Reported: shards/s, samples/s and MB/s, and the time 10,000 such shards would take at that
rate. Real shards of 1,000 ImageNet-sized JPEGs are ~110 MB: the header count streams every byte, so there
it is bound by the bandwidth from the object store to the CPU nodes (an index avoids it altogether).
Object uploads are not timed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _tar(samples: int, start: int = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(start, start + samples):
            for ext, data in (("jpg", b"\xff"), ("cls", b"1")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _moto(port: int) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=1)
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("moto_server did not start") from None
            time.sleep(0.3)


def _put_all(s3, bucket: str, objects, threads: int = 32) -> None:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=10_000, help="shards with stats files (default: 10,000)")
    p.add_argument("--bare", type=int, default=200, help="shards without any index, counted on Ray (default: 200)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default: 1,000)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    import boto3

    from pipeline.data import count_on_ray, resolve_source

    port = 45000 + os.getpid() % 10000
    proc = _moto(port)
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    s3 = boto3.client("s3", endpoint_url=url)
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "shards": args.shards,
        "per_shard": args.per_shard,
        "bare_shards": args.bare,
    }
    try:
        s3.create_bucket(Bucket="bench")
        t0 = time.perf_counter()
        small = _tar(1)
        stats = json.dumps({"count": args.per_shard + 7, "successes": args.per_shard, "failed_to_download": 7}).encode()
        objects = (
            kv
            for i in range(args.shards)
            for kv in (
                (f"laion/{i:05d}.tar", small),
                (f"laion/{i:05d}_stats.json", stats),
                (f"laion/{i:05d}.parquet", b"PAR1"),
            )
        )
        _put_all(s3, "bench", objects)
        print(f"uploaded {3 * args.shards:,} objects in {time.perf_counter() - t0:.0f} s (not timed)")

        t0 = time.perf_counter()
        info = resolve_source("s3://bench/laion", "train")
        listed_s = time.perf_counter() - t0
        assert info.counted and info.count == args.shards * args.per_shard, (info.count, info.counted_by)
        report.update(stats_s=round(listed_s, 2), stats_samples=info.count, counted_by=info.counted_by)
        print(
            f"with stats files: {args.shards:,} shards ({3 * args.shards:,} objects listed), {info.count:,} samples "
            f"counted in {listed_s:.1f} s ({info.counted_by}); before Ray starts"
        )

        if args.bare:
            import ray

            body = _tar(args.per_shard)
            _put_all(s3, "bench", ((f"bare/shard-{i:06d}.tar", body) for i in range(args.bare)))
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            try:
                t0 = time.perf_counter()
                bare = resolve_source("s3://bench/bare", "train")
                list_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                bare = count_on_ray(bare, num_cpus=0.25)
                count_s = time.perf_counter() - t1
            finally:
                ray.shutdown()
            assert bare.count == args.bare * args.per_shard
            mb = args.bare * len(body) / 2**20
            rate = args.bare / count_s
            report.update(
                bare_list_s=round(list_s, 2),
                bare_count_s=round(count_s, 2),
                bare_shards_per_s=round(rate, 1),
                bare_mb_per_s=round(mb / count_s, 1),
                bare_shard_mb=round(len(body) / 2**20, 2),
                bare_10k_extrapolated_s=round(10_000 / rate, 0),
            )
            print(
                f"without any index: {args.bare} shards of {args.per_shard:,} samples "
                f"({len(body) / 2**20:.2f} MB each) "
                f"listed in {list_s:.1f} s, headers counted on Ray in {count_s:.1f} s: {rate:.1f} shards/s, "
                f"{args.per_shard * rate:,.0f} samples/s, {mb / count_s:.0f} MB/s; 10,000 such shards: "
                f"~{10_000 / rate / 60:.1f} min at this rate"
            )
    finally:
        proc.terminate()
        proc.wait(10)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
