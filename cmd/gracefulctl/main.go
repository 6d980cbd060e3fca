// Command gracefulctl asks a server built with graceful to upgrade itself
// through its control socket (Options.ControlSocket) and reports the
// outcome truthfully: it exits 0 once the new process is ready, and 1 with
// the reason when the upgrade failed (the old process keeps serving). Use it
// as systemd's ExecReload=, where "kill -HUP" would report success even when
// the new binary crashed.
//
//	gracefulctl -socket /run/myapi/control.sock upgrade
//	gracefulctl -socket /run/myapi/control.sock status
//	gracefulctl -socket /run/myapi/control.sock status -json
//	gracefulctl -socket /run/myapi/control.sock deploy ./myapi-v2
//	gracefulctl -socket /run/myapi/control.sock rollback
//	gracefulctl supervise -- /usr/local/bin/myapi -addr :8080
//
// deploy NEWBINARY copies the file once beside the running binary's path
// PATH and checks the copy (a regular executable file, a whole program for
// this machine or a script, unchanged while it was copied): what the
// server starts is what was checked. It checks every file it will write
// (PATH.previous may be absent, a file or a symbolic link, never a
// directory) before changing anything, then installs the copy atomically
// at PATH, the replaced binary as PATH.previous, and upgrades. If the
// upgrade is refused (the new process fails, or a probation rolls it
// back), PATH and PATH.previous are put back as they were, the very same
// files, so that no restart ever starts the refused version, and it exits
// 1. rollback reinstates PATH.previous the same way (a copy of the file it
// leads to, when it is a symbolic link), and refuses when PATH.previous is
// missing or holds the running binary's bytes. PATH and PATH.previous are
// never one file, and no temporary file is left behind.
//
// Deploys and rollbacks of one PATH run one at a time: a second one waits
// for the first to end (saying so, with the holder's PID), until -timeout
// or a signal, which change nothing. The lock is flock(2) on the file
// .NAME.deploy-lock beside PATH, so it is released when its process ends,
// even killed; the file stays there (empty when no one holds it: it is not
// a refused binary), and anything but a regular file there is refused.
//
// Interrupted (SIGINT, SIGTERM, -timeout) after asking for the upgrade,
// deploy and rollback do not guess: they wait for the server's outcome (at
// most 2 minutes more; a probation may still be judging; a second signal
// stops the wait), asking the server's record when the answer is lost, and
// make the disk match it: exit 0 if the new process serves, 1 with the
// previous binary back if not. If the server has not decided by then, the
// new binary stays at PATH, and the message says so. Interrupted before
// asking, they change nothing.
//
// status prints "pid N PHASE" on its first line, then the generation, the
// build, the uptime and the last upgrades with their outcomes and timings;
// -json prints the whole record as JSON, for machines. (A server of a
// version before the record prints the first line only.)
//
// supervise runs the server under a process whose PID never changes (see
// package supervisor): for systemd (its stop then drains after upgrades),
// a container's PID 1, supervisord, runit or a terminal. It exits with the
// server's status.
//
// Exit codes: 0 success, 1 the process answered with an error or could not
// be reached, 2 bad usage; supervise exits with the server's code.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/control"
	"github.com/graceful-go/graceful/supervisor"
)

func main() {
	supervisor.Trampoline() // when started by supervise to exec the server
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "supervise" {
		return supervise(args[1:], stderr)
	}
	fs := flag.NewFlagSet("gracefulctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", "", "path of the server's control socket (required)")
	timeout := fs.Duration("timeout", 0, "give up waiting after this long (0: wait for the server's answer, which its UpgradeTimeout bounds); deploy and rollback then still wait for the server's outcome, at most 2m")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: gracefulctl -socket PATH [-timeout D] upgrade|status [-json]|deploy NEWBINARY|rollback\n       gracefulctl supervise [--] SERVER [ARGS...]\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *socket == "" || fs.NArg() < 1 {
		fs.Usage()
		return 2
	}
	cmd := fs.Arg(0)
	var asJSON bool
	switch {
	case cmd == "status":
		sub := flag.NewFlagSet("gracefulctl status", flag.ContinueOnError)
		sub.SetOutput(stderr)
		sub.BoolVar(&asJSON, "json", false, "print the whole status record as JSON")
		if err := sub.Parse(fs.Args()[1:]); err != nil || sub.NArg() > 0 {
			fs.Usage()
			return 2
		}
	case (cmd == "upgrade" || cmd == "rollback") && fs.NArg() == 1:
	case cmd == "deploy" && fs.NArg() == 2:
	case cmd == "upgrade", cmd == "rollback", cmd == "deploy":
		fs.Usage()
		return 2
	default:
		fmt.Fprintf(stderr, "gracefulctl: unknown command %q (want upgrade, status, deploy or rollback)\n", cmd)
		return 2
	}
	// The first signal (or -timeout) ends ctx; deploy and rollback then
	// still wait for the server's outcome, until a second signal ends hard.
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	hard, hardCancel := context.WithCancelCause(context.Background())
	defer hardCancel(nil)
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	done := make(chan struct{})
	watched := make(chan struct{})
	defer func() { close(done); <-watched }()
	go func() {
		defer close(watched)
		for i := 0; i < 2; i++ {
			select {
			case sig := <-sigs:
				if i == 0 {
					cancel(fmt.Errorf("interrupted (%v)", sig))
				} else {
					hardCancel(fmt.Errorf("interrupted again (%v)", sig))
				}
			case <-done:
				return
			}
		}
	}()
	if *timeout > 0 {
		var cancelT context.CancelFunc
		ctx, cancelT = context.WithTimeoutCause(ctx, *timeout, fmt.Errorf("-timeout %v reached", *timeout))
		defer cancelT()
	}
	start := time.Now()
	var msg string
	var err error
	switch cmd {
	case "upgrade":
		msg, err = control.Upgrade(ctx, *socket)
	case "status":
		msg, err = status(ctx, *socket, asJSON)
	case "deploy":
		msg, err = deploy(ctx, hard, *socket, fs.Arg(1), stderr)
	case "rollback":
		msg, err = rollback(ctx, hard, *socket, stderr)
	}
	if err != nil {
		fmt.Fprintf(stderr, "gracefulctl: %s failed after %v: %v\n", cmd, time.Since(start).Round(time.Millisecond), err)
		return 1
	}
	fmt.Fprintln(stdout, msg)
	return 0
}

// status returns the status report: JSON, or for people.
func status(ctx context.Context, socket string, asJSON bool) (string, error) {
	st, err := control.Details(ctx, socket)
	if err != nil && !asJSON && ctx.Err() == nil {
		// An older server (unknown command), or a newer one whose record
		// does not decode: the first line is still worth printing.
		return control.Status(ctx, socket)
	}
	if err != nil {
		return "", err
	}
	if asJSON {
		b, err := json.MarshalIndent(st, "", "  ")
		return string(b), err
	}
	return describe(st, time.Now()), nil
}

// describe formats st for people; now is when it is read.
func describe(st graceful.Status, now time.Time) string {
	var b strings.Builder
	fmt.Fprintf(&b, "pid %d %s\n", st.PID, st.Phase)
	fmt.Fprintf(&b, "generation %d, build %s, up %v\n", st.Generation, st.Build, now.Sub(st.Started).Round(time.Second))
	if st.Executable != "" {
		fmt.Fprintf(&b, "binary %s\n", st.Executable)
	}
	t := st.Totals
	fmt.Fprintf(&b, "upgrades: %d succeeded, %d failed, %d rolled back; drains: %d (connections handed %d, not handed %d, retired %d, expired %d, forced %d)",
		t.Succeeded, t.Failed, t.RolledBack, t.Drains, t.Drain.Handed, t.Drain.NotHanded, t.Drain.Retired, t.Drain.Expired, t.Drain.Forced)
	if len(st.Upgrades) > 0 {
		fmt.Fprintf(&b, "\nlast %d upgrades, oldest first:", len(st.Upgrades))
	}
	for _, u := range st.Upgrades {
		fmt.Fprintf(&b, "\n  %s  %-11s  pid %d -> ", u.Started.Local().Format(time.DateTime), u.Outcome, u.OldPID)
		if u.NewPID != 0 {
			fmt.Fprintf(&b, "%d", u.NewPID)
		} else {
			b.WriteString("?")
		}
		fmt.Fprintf(&b, " (generation %d)", u.Generation)
		switch u.Outcome {
		case graceful.OutcomeSucceeded:
			fmt.Fprintf(&b, ", ready after %v", u.Duration.Round(time.Millisecond))
		case graceful.OutcomeFailed:
			fmt.Fprintf(&b, ", after %v: %s", u.Duration.Round(time.Millisecond), u.Err)
		}
		if d := u.Drain; d != nil {
			fmt.Fprintf(&b, "; old drained in %v: %d in flight, %d handed, %d retired, %d forced",
				d.Duration.Round(time.Millisecond), d.InFlight, d.Handed, d.Retired, d.Forced)
		}
	}
	return b.String()
}

// supervise runs the server command in args under a supervisor.
func supervise(args []string, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) == 0 {
		fmt.Fprintf(stderr, "usage: gracefulctl supervise [--] SERVER [ARGS...]\n")
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, nil)).With("supervisor", os.Getpid())
	code, err := supervisor.Run(context.Background(), supervisor.Config{Command: args, Log: log, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr})
	if err != nil {
		fmt.Fprintf(stderr, "gracefulctl supervise: %v\n", err)
		return 1
	}
	return code
}
