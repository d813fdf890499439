from commvq.cli import entry

entry()
