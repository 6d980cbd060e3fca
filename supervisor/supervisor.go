// Package supervisor is a small process whose PID never changes, for
// service managers that must keep track of a server that upgrades itself
// in place: systemd (whose stop logic does not wait for a main process that
// is not its own child, and after an in-place upgrade the new process is
// not), a container's PID 1, supervisord, runit, s6 or a terminal. The
// command `gracefulctl supervise -- SERVER ARGS...` runs it.
//
// The supervisor starts the server and stays its manager's child for the
// service's whole life. It follows the server's generations through the
// systemd notify protocol the server already speaks: it gives the server a
// notify socket of its own, learns each new generation from MAINPID=, and
// becomes a child subreaper, so that each generation is reparented to it
// when its predecessor exits. It forwards SIGHUP, SIGTERM, SIGINT, SIGQUIT,
// SIGUSR1 and SIGUSR2 to the current generation; while it waits for a
// successor, a process the command left behind or an older generation's
// drain, a stop (SIGTERM, SIGINT, SIGQUIT) goes to whatever runs of the
// service and the others wait for the next generation (their default
// action would end a process not handling them yet). It reaps every process
// reparented to it while it runs (as PID 1, every orphan of the
// container); it relays
// READY=1, RELOADING=1, STOPPING=1, EXTEND_TIMEOUT_USEC=, WATCHDOG=1 and
// the current generation's STATUS= to its own manager, never MAINPID=, so
// that its own PID stays the main one. Its notify socket is an abstract
// one, which any local process may send to: a datagram is read only to be
// dropped unless the kernel's credentials say it comes from the service (a
// generation it knows, or a descendant running as a user the service runs
// as), and no datagram, however many, delays signal forwarding.
//
// When the current generation exits without a successor, the supervisor
// exits with its status (128+N for a signal N); one that dies while still
// its predecessor's child (its status goes there) makes it exit 1. Either
// way, an older generation still draining is waited for first (at most
// the EXTEND_TIMEOUT_USEC= it announced, else 90 s), its manager told
// STOPPING=1: exiting would orphan it, and as PID 1 the kernel would kill
// it. A server command that exits 0 before any READY=1 while processes it
// started live on (sh -c 'server & exit 0') is followed to the one that
// declares itself ready within 60 s; if none does, the supervisor says so
// and exits 1. It needs /proc to show its PID namespace (as PID 1, a /proc
// of the container's own).
//
// The server must not outlive its supervisor, even one killed by SIGKILL,
// and a parent-death signal cannot do it (every generation after the first
// is its predecessor's child). So before the server the supervisor starts
// a warden, its own binary again (see [Trampoline]), in a process group of
// its own, which the first generation joins and every later one inherits:
// the group's number, the warden's PID, cannot name another group while
// the warden lives. The warden ignores the signals of a terminal and of a
// service manager's stop (systemd's default KillMode=control-group sends
// SIGTERM to every process of the service), and holds the read end of a
// pipe only the supervisor writes to: when Run returns or the supervisor
// dies, whatever is left of the group is sent SIGTERM, so that it drains
// as at a stop, releasing its listeners and socket files for the next
// start, and SIGKILL 90 s later. A process that leaves the group (setsid)
// is out of its reach: the supervisor warns when it follows one as the
// server, and stops one left behind by the command itself when it gives
// up waiting for it.
//
// Sockets passed by socket activation (LISTEN_FDS) are passed on to the
// first generation, with LISTEN_PID naming it. The supervisor does not
// restart a crashed server itself: it exits with the server's status, and
// the manager's own policy (systemd Restart=, Docker's restart policy)
// restarts the service, as it would without a supervisor; holding the
// sockets and restarting is what socket activation already does.
package supervisor

import (
	"context"
	"errors"
	"io"
	"log/slog"
)

// Config is what Run supervises.
type Config struct {
	// Command is the server and its arguments. The first generation is
	// started from it; later ones are started by the server itself.
	Command []string
	// Log receives the supervisor's own messages; nil means none.
	Log *slog.Logger
	// Stdin, Stdout and Stderr of the server; nil means none.
	Stdin          io.Reader
	Stdout, Stderr io.Writer
}

// ErrNotSupported is returned by Run where a subreaper is not available
// (outside Linux).
var ErrNotSupported = errors.New("supervisor: needs Linux (child subreaper)")

// Run starts the server, follows its generations until the last exits
// without a successor, and returns the exit code to exit with: the
// server's, or 128+N if a signal N ended it. ctx ending forwards SIGTERM to
// the current generation, as the signal would. An error means the server
// could not be started.
func Run(ctx context.Context, cfg Config) (int, error) {
	if len(cfg.Command) == 0 {
		return 0, errors.New("supervisor: no command")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return run(ctx, cfg)
}
