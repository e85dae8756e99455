"""The FailedOperation operator (`payguard operator`): Kopf handlers over app.failures.

Not a package named `operator`, which would shadow the standard library's.
"""
