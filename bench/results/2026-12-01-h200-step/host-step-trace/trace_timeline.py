# ruff: noqa: B023, E402, E501, E741  (a lab probe kept as it ran: its closures run inside their loop)
import sys

from jax.profiler import ProfileData

pd = ProfileData.from_file(sys.argv[1])
planes = {p.name: p for p in pd.planes}
py = [l for l in planes["/host:CPU"].lines if l.name == "python3"][0]
evs = sorted([(e.start_ns, e.duration_ns, e.name) for e in py.events])
calls = [e for e in evs if e[2] == "next_token"]
launch = [e for e in evs if e[2].startswith("cuGraphLaunch")]
puts = [e for e in evs if e[2] == "$programs.py:80 put"]
gets = [e for e in evs if e[2] == "$programs.py:85 get"]
gpu = {l.name: sorted([(e.start_ns, e.duration_ns, e.name) for e in l.events]) for l in planes["/device:GPU:0"].lines}
comp = [e for k, v in gpu.items() if "Compute" in k for e in v]
h2d = [e for k, v in gpu.items() if "H2D" in k for e in v]
d2h = [e for k, v in gpu.items() if "D2H" in k for e in v]
for i, (s, d, _) in enumerate(calls):
    end = s + d
    ks = [e for e in comp if s <= e[0] <= end]
    busy = sum(e[1] for e in ks)
    L = [e for e in launch if s <= e[0] <= end]
    p = [e for e in puts if s <= e[0] <= end][0]
    g = [e for e in gets if s <= e[0] <= end][0]
    u = [e for e in h2d if s <= e[0] <= end]
    dd = [e for e in d2h if s <= e[0] <= end + 10**6]

    def us(t):
        return round((t - s) / 1e3, 1)

    print(
        f"call {i}: {d / 1e3:.0f} us; put {us(p[0])}-{us(p[0] + p[1])}; H2D at {[us(e[0]) for e in u]}; "
        f"launches at {[us(e[0]) for e in L]} (each {[round(e[1] / 1e3) for e in L]}); first kernel {us(ks[0][0])}; "
        f"last kernel end {us(ks[-1][0] + ks[-1][1])}; kernels {len(ks)} busy {busy / 1e3:.0f} us; D2H {[us(e[0]) for e in dd][:1]}; get {us(g[0])}-{us(g[0] + g[1])}"
    )
    # gaps in GPU: sum of idle between kernels
    gaps = [(ks[j + 1][0] - (ks[j][0] + ks[j][1])) / 1e3 for j in range(len(ks) - 1)]
    big = sorted([(round(gp), j) for j, gp in enumerate(gaps) if gp > 20], reverse=True)[:8]
    print("   big GPU gaps (us, after kernel #):", big)
