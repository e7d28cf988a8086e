#!/bin/bash
# usage: run1.sh TREE(old|head) TAG [extra env...]
tree=$1; tag=$2
d=/tmp/apicost/runs/$tag; mkdir -p $d
cd /tmp/apicost
if [ $tree = old ]; then export PYTHONPATH=/tmp/apicost/oldpkg; else unset PYTHONPATH; fi
export TMPDIR=$d
start=$(date +%s)
/work/main/.venv/bin/python /work/main/benchmarks/server_cpu_cost.py --model /tmp/apicost/ckpt --concurrency ${CONC:-16} --frames ${FRAMES:-40} --device cpu > $d/out.txt 2> $d/err.txt
echo "rc=$? wall=$(( $(date +%s)-start ))s" >> $d/out.txt
grep -h "speech service ready" $d/tmp*/server.log | sed 's/^/READY-LINE: /' | cut -c1-160 >> $d/out.txt
