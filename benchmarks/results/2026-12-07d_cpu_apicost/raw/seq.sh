#!/bin/bash
export FRAMES=80 CONC=16
for i in 1 2 3; do
  ./run1.sh old r${i}_old
  ./run1.sh head r${i}_head
done
echo done > /tmp/apicost/runs/SEQ_DONE
