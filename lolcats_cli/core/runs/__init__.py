"""Run directories: a run's file names and the finished-run check (``rundir``); creating, recording and
opening them (``workspace``)."""
