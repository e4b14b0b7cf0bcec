"""The deploy stage: roll an image out to selected hosts in waves (engine.py), over
the herd, the MDB and the image server (ports.py); what a deploy is (model.py), its
waves, health gate, JSON views, errors and store. The HTTP side is
dominator/server/http/deploys.py."""
