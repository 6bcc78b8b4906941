"""The audit's controls, one module per part of the report; each control is a function of the
gathered `Inputs` (and, for some, evidence read once for several) returning one `Control`.

host           Host and service: host facts, the service account, how it is launched
configuration  Configuration: the file, listen addresses, offline mode, secrets
posture        Posture: file owners and modes, egress blocking
integrity      Model integrity: the weights against their manifest or signature
software       Software environment: the server's venv, the daemon's own software
requests       Request records: the chain and seals, every answered request, activity
incidents      Incidents: event-log coverage, restarts and parked periods, changes
findings       What several controls share: a guard's last check, problems to a verdict
"""
