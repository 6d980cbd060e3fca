// Command demo shows a zero-downtime upgrade end to end: it builds the
// reference server (examples/httpserver) into a temporary directory, starts
// it, sends mixed load (keep-alive GET and POST, fresh connections, slow
// requests in flight, SSE and WebSocket streams), upgrades it in place by
// SIGHUP a few times, and prints what the clients saw.
//
//	go run ./examples/demo
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/graceful-go/graceful/internal/loadtest"
)

func main() {
	upgrades := flag.Int("upgrades", 3, "number of in-place upgrades")
	gap := flag.Duration("gap", time.Second, "traffic between upgrades")
	keepLogs := flag.Bool("v", false, "show the servers' logs")
	flag.Parse()
	if err := run(*upgrades, *gap, *keepLogs); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(upgrades int, gap time.Duration, verbose bool) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	dir, err := os.MkdirTemp("", "graceful-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	fmt.Println("building examples/httpserver ...")
	bin, err := loadtest.Build(ctx, dir, "github.com/graceful-go/graceful/examples/httpserver", false)
	if err != nil {
		return err
	}
	logs, err := os.Create(filepath.Join(dir, "server.log"))
	if err != nil {
		return err
	}
	defer logs.Close()
	srv, err := loadtest.Start(ctx, loadtest.Config{Bin: bin, Dir: dir, Logs: logs})
	if err != nil {
		return err
	}
	defer srv.Kill()
	fmt.Printf("server PID %d listening on %s\n", srv.PID(), srv.Addr)

	load := loadtest.StartLoad(srv.Addr, loadtest.Mix{
		KeepAliveGET: 4, KeepAlivePOST: 4, FreshGET: 2, Slow: 2, SSE: 3, WS: 3,
		Pause: 5 * time.Millisecond,
	})
	var results []loadtest.Upgrade
	var upErr error
	for i := range upgrades {
		if !sleep(ctx, gap) {
			break
		}
		u, err := srv.Upgrade(ctx, 30*time.Second)
		if err != nil {
			upErr = fmt.Errorf("upgrade %d: %w", i+1, err)
			break
		}
		results = append(results, u)
		fmt.Printf("upgrade %d: PID %d -> %d, SIGHUP->new ready %v, SIGHUP->old exit %v (exit code %d)\n",
			i+1, u.OldPID, u.NewPID, u.Ready.Round(time.Millisecond), u.OldExit.Round(time.Millisecond), u.ExitCode)
	}
	sleep(ctx, gap)
	stats := load.Stop()
	code, stopErr := srv.Stop(context.Background(), 30*time.Second)

	fmt.Println()
	fmt.Printf("== report: %d upgrades ==\n", len(results))
	stats.Report(os.Stdout)
	fmt.Printf("final SIGTERM: exit code %d\n", code)
	if verbose {
		logs.Sync()
		b, _ := os.ReadFile(logs.Name())
		fmt.Printf("\n== server logs ==\n%s", b)
	}
	switch {
	case upErr != nil:
		return upErr
	case stopErr != nil:
		return fmt.Errorf("final stop: %w", stopErr)
	case stats.Failed() > 0:
		return fmt.Errorf("%d failures", stats.Failed())
	}
	fmt.Println("zero downtime: no request failed, no stream was cut")
	return nil
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
