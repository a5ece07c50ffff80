import subprocess, time, os, sys
S = "/work/main/.scratch_slurm/slurm_cluster.sh"
D = "/tmp/sc5"
env = dict(os.environ, SLURM_CONF=f"{D}/slurm.conf")
starts, runs, stops = [], [], []
for i in range(5):
    t = time.time(); r = subprocess.run([S, "start", D], capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL, start_new_session=True); starts.append(time.time() - t)
    assert r.returncode == 0, r
    t = time.time(); r = subprocess.run(["srun", "-N1", "--ntasks-per-node=2", "python3", "/work/main/.scratch_slurm/rdv.py"], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL); runs.append(time.time() - t)
    assert r.returncode == 0 and "got ranks [1]" in r.stdout, r
    t = time.time(); r = subprocess.run([S, "stop", D], capture_output=True, text=True, timeout=60); stops.append(time.time() - t)
    assert r.returncode == 0, r
fmt = lambda l: " ".join(f"{x:.2f}" for x in l)
print("start", fmt(starts)); print("srun rdv", fmt(runs)); print("stop", fmt(stops))
