"""The herd: the core that keeps every sub of the MDB on its image (herd.py), with
its pieces: statuses and reports (status.py), planning (convergence.py), computed
files, the intrusion signal, the image cache, the state store and its metrics."""
