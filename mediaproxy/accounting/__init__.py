"""Accounting of finished sessions (SPEC §7): backends behind one small
interface (`name`, `open()`, `write(statistics)`, `close()`, all blocking and
run in a thread of their own), each fed by a durable spool so that no record
is lost while a backend is down or the dispatcher restarts."""
