import json, glob, re, statistics as st
rows = []
for d in sorted(glob.glob('/tmp/apicost/runs/r*')) + sorted(glob.glob('/tmp/apicost/runs/x*')):
    out = open(d + '/out.txt').read()
    if 'frames at' not in out: continue
    tag = d.split('/')[-1]
    frames = int(out.split()[0])
    cpu = {}
    for line in out.splitlines():
        m = re.match(r'\| (.*?) \| ([\d.]+) \| (\d+) \|', line)
        if m:
            n = m.group(1)
            k = 'api' if 'api_s' in n else 'codec' if 'codec.worker' in n else 'engine' if 'EngineCore' in n else 'worker' if 'Worker' in n else None
            if k: cpu[k] = float(m.group(2))
    lj = json.load(open(glob.glob(d + '/tmp*/load.json')[0]))['levels'][0]
    e = lj.get('engine') or {}
    old = 'service.py:160' in out
    rows.append(dict(tag=tag, tree='old f3b56cd' if old else 'head+wt', frames=frames, requests=lj['requests'], ok=lj['ok'],
                     load_wall_s=lj['wall_s'], **cpu, loop_lag_ms=e.get('loop_lag_ms'), tokens_per_step=e.get('tokens_per_step'),
                     codec_frames_per_call=e.get('codec_frames_per_call')))
print('| run | tree | frames | req ok | load wall s | API CPU s | API µs/frame | API ms/request | API CPU s per load-s | EngineCore µs/frame | model Worker µs/frame | codec µs/frame | loop lag ms | rows/step |')
print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
for r in rows:
    f = r['frames']
    print(f"| {r['tag']} | {r['tree']} | {f} | {r['ok']}/{r['requests']} | {r['load_wall_s']:.1f} | {r['api']:.2f} | {1e6*r['api']/f:.0f} | {1e3*r['api']/r['requests']:.1f} | {r['api']/r['load_wall_s']:.4f} | {1e6*r['engine']/f:.0f} | {1e6*r['worker']/f:.0f} | {1e6*r['codec']/f:.0f} | {r['loop_lag_ms']} | {r['tokens_per_step']} |")
print()
for tree in ('old f3b56cd', 'head+wt'):
    xs = [r for r in rows if r['tree'] == tree and r['tag'].startswith('r')]
    if not xs: continue
    for k in ('api', 'engine', 'worker', 'codec'):
        v = [1e6 * r[k] / r['frames'] for r in xs]
        print(f"{tree:12s} {k:7s} µs/frame: mean {st.mean(v):7.0f}  min {min(v):7.0f}  max {max(v):7.0f}  sd {st.stdev(v) if len(v)>1 else 0:6.0f}  n={len(v)}")
    v = [r['api'] / r['load_wall_s'] for r in xs]
    print(f"{tree:12s} api CPU s per load second: mean {st.mean(v):.4f} min {min(v):.4f} max {max(v):.4f}")
