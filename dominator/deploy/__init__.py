"""The deploy stage: roll an image out to selected hosts in waves (engine.py), over
the herd, the MDB and the image server (ports.py); what a deploy is (model.py), its
waves, health gate, JSON views, errors, store and runner lease (store.py, lease.py:
which dominator of several runs each deploy). The HTTP side is
dominator/server/http/deploys.py."""
