# ruff: noqa: B023, E402, E501, E741  (a lab probe kept as it ran: its closures run inside their loop)
import collections
import sys

from jax.profiler import ProfileData

pd = ProfileData.from_file(sys.argv[1])
planes = {p.name: p for p in pd.planes}
host = planes["/host:CPU"]
py = [l for l in host.lines if l.name == "python3"][0]
evs = sorted([(e.start_ns, e.duration_ns, e.name) for e in py.events])
t0 = evs[0][0]
# top-level events: find next_token calls
agg = collections.defaultdict(list)
for _s, d, n in evs:
    agg[n].append(d / 1e3)
for n, v in sorted(agg.items(), key=lambda kv: -sum(kv[1]))[:40]:
    print(f"{sum(v):9.1f} us total  x{len(v):4d}  median {sorted(v)[len(v) // 2]:8.1f}  {n[:110]}")
gpu = planes["/device:GPU:0"]
for l in gpu.lines:
    ev = sorted([(e.start_ns, e.duration_ns, e.name) for e in l.events])
    print("GPU", l.name, len(ev), "first", (ev[0][0] - t0) / 1e3, "last end", (ev[-1][0] + ev[-1][1] - t0) / 1e3)
    if "Memcpy" in l.name:
        for e in ev:
            print("    ", (e[0] - t0) / 1e3, e[1] / 1e3, e[2][:80])
