// Command gracefulctl asks a server built with graceful to upgrade itself
// through its control socket (Options.ControlSocket) and reports the
// outcome truthfully: it exits 0 once the new process is ready, and 1 with
// the reason when the upgrade failed (the old process keeps serving). Use it
// as systemd's ExecReload=, where "kill -HUP" would report success even when
// the new binary crashed.
//
//	gracefulctl -socket /run/myapi/control.sock upgrade
//	gracefulctl -socket /run/myapi/control.sock status
//
// Exit codes: 0 success, 1 the process answered with an error or could not
// be reached, 2 bad usage.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/graceful-go/graceful/control"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("gracefulctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", "", "path of the server's control socket (required)")
	timeout := fs.Duration("timeout", 0, "give up waiting after this long (0: wait for the server's answer, which its UpgradeTimeout bounds)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: gracefulctl -socket PATH [-timeout D] upgrade|status\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *socket == "" || fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	cmd := fs.Arg(0)
	commands := map[string]func(context.Context, string) (string, error){"upgrade": control.Upgrade, "status": control.Status}
	do, ok := commands[cmd]
	if !ok {
		fmt.Fprintf(stderr, "gracefulctl: unknown command %q (want upgrade or status)\n", cmd)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	start := time.Now()
	msg, err := do(ctx, *socket)
	if err != nil {
		fmt.Fprintf(stderr, "gracefulctl: %s failed after %v: %v\n", cmd, time.Since(start).Round(time.Millisecond), err)
		return 1
	}
	fmt.Fprintln(stdout, msg)
	return 0
}
