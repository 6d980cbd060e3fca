// Command demo shows a zero-downtime upgrade end to end: it builds the
// reference server (examples/httpserver) into a temporary directory, starts
// it, sends mixed load (keep-alive GET and POST, fresh connections, slow
// requests in flight, SSE and WebSocket streams), upgrades it in place by
// SIGHUP a few times, and prints what the clients saw. Each new version is
// on probation first (-probation): it serves a share of the connections and
// is promoted on what it served. Then (-canary) it deploys a failing build
// (30% of its answers are 500s) with gracefulctl deploy: the bad build
// serves its share, is rolled back, the good binary is put back on disk,
// and the report shows what the clients saw.
//
//	go run ./examples/demo
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/graceful-go/graceful/internal/loadtest"
)

func main() {
	upgrades := flag.Int("upgrades", 3, "number of in-place upgrades")
	gap := flag.Duration("gap", time.Second, "traffic between upgrades")
	keepLogs := flag.Bool("v", false, "show the servers' logs")
	probation := flag.Duration("probation", 2*time.Second, "each new version's probation (0: none)")
	canary := flag.Bool("canary", true, "after the upgrades, deploy a failing build and watch it rolled back (needs -probation)")
	flag.Parse()
	if err := run(*upgrades, *gap, *keepLogs, *probation, *canary && *probation > 0); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(upgrades int, gap time.Duration, verbose bool, probation time.Duration, canary bool) error {
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
	sock := filepath.Join(dir, "control.sock")
	args := []string{"-control", sock}
	if probation > 0 {
		args = append(args, "-probation", probation.String(), "-canary-share", fmt.Sprint(canaryShare))
	}
	srv, err := loadtest.Start(ctx, loadtest.Config{Bin: bin, Dir: dir, Logs: logs, Args: args})
	if err != nil {
		return err
	}
	defer srv.Kill()
	fmt.Printf("server PID %d listening on %s", srv.PID(), srv.Addr)
	if probation > 0 {
		fmt.Printf("; each new version on probation for %v with %v%% of the connections", probation, 100*canaryShare)
	}
	fmt.Println()

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
	fmt.Println()
	fmt.Printf("== report: %d upgrades ==\n", len(results))
	stats.Report(os.Stdout)

	var canaryErr error
	if canary && upErr == nil && ctx.Err() == nil {
		canaryErr = deployFailing(ctx, dir, bin, sock, srv)
	}
	code, stopErr := srv.Stop(context.Background(), 30*time.Second)
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
	case canaryErr != nil:
		return canaryErr
	}
	fmt.Println("zero downtime: no request failed, no stream was cut")
	if canary {
		fmt.Println("the failing build was rolled back: its clients saw only its own 500s, and it is not left on disk")
	}
	return nil
}

// canaryShare is the share of connections a new version serves on
// probation.
const canaryShare = 0.2

// deployFailing deploys, under load, a build that answers 30% of its
// requests with 500, with gracefulctl deploy; it must be rolled back, with
// the good binary back at bin, and the clients must see nothing but the
// bad build's 500s.
func deployFailing(ctx context.Context, dir, bin, sock string, srv *loadtest.Server) error {
	fmt.Println()
	fmt.Println("building a failing build (-ldflags \"-X main.version=v2-bad -X main.failRate=0.3\") and gracefulctl ...")
	bad, err := loadtest.BuildWith(ctx, filepath.Join(dir, "bad"), "github.com/graceful-go/graceful/examples/httpserver", false, "-X main.version=v2-bad -X main.failRate=0.3")
	if err != nil {
		return err
	}
	ctl, err := loadtest.Build(ctx, filepath.Join(dir, "ctl"), "github.com/graceful-go/graceful/cmd/gracefulctl", false)
	if err != nil {
		return err
	}
	good, err := os.ReadFile(bin)
	if err != nil {
		return err
	}
	old := srv.PID()
	load := loadtest.StartLoad(srv.Addr, loadtest.Mix{KeepAliveGET: 10, FreshGET: 4, SSE: 2, WS: 2})
	sleep(ctx, 300*time.Millisecond)
	fmt.Printf("$ gracefulctl -socket %s deploy %s\n", sock, bad)
	out, deployErr := exec.CommandContext(ctx, ctl, "-socket", sock, "deploy", bad).CombinedOutput()
	fmt.Print(string(out))
	code := 0
	if ee, ok := deployErr.(*exec.ExitError); ok {
		code = ee.ExitCode()
	}
	fmt.Printf("(exit status %d)\n", code)
	sleep(ctx, 300*time.Millisecond)
	stats := load.Stop()
	srv.Follow() // had it been promoted, stop the process that serves
	now, err := os.ReadFile(bin)
	if err != nil {
		return err
	}
	fmt.Println()
	fmt.Println("== report: the failing build ==")
	stats.Report(os.Stdout)
	transport := stats.Failed() - stats.Failures["status"]
	fmt.Printf("what its clients saw: %d answers 500 from the bad build during its probation; %d other failures\n", stats.Failures["status"], transport)
	fmt.Printf("serving PID: %d (was %d); binary at %s restored byte for byte: %v\n", srv.PID(), old, bin, bytes.Equal(now, good))
	switch {
	case code != 1:
		return fmt.Errorf("gracefulctl deploy of the failing build: exit status %d, want 1 (rolled back)", code)
	case !strings.Contains(string(out), "rolled back"):
		return errors.New("the failing build was not rolled back")
	case transport > 0:
		return fmt.Errorf("%d failures besides the bad build's 500s", transport)
	case srv.PID() != old:
		return fmt.Errorf("serving PID changed from %d to %d", old, srv.PID())
	case !bytes.Equal(now, good):
		return errors.New("the good binary is not back on disk")
	}
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
