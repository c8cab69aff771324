"""Training objectives: stage 1 (ITC, ITM with hard negatives, ITG); stage 2 comes with its issue."""
