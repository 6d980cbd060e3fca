package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/control"
	"github.com/graceful-go/graceful/internal/loadtest"
)

// startCanaryServer starts the reference server bin with a control socket
// and a probation of window at share, and returns it with its control
// socket and log path; the test's cleanup kills every generation.
func startCanaryServer(t *testing.T, ctx context.Context, bin string, window time.Duration, share string, args ...string) (*loadtest.Server, string, string) {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "control.sock")
	logPath := filepath.Join(dir, "server.log")
	logs, err := os.Create(logPath)
	require.NoError(t, err)
	args = append([]string{"-control", sock, "-upgrade-timeout", "30s", "-probation", window.String(), "-canary-share", share}, args...)
	srv, err := loadtest.Start(ctx, loadtest.Config{Bin: bin, Dir: dir, Logs: logs, Args: args})
	require.NoError(t, err)
	t.Cleanup(func() {
		srv.Kill()
		logs.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("server logs:\n%s", b)
		}
	})
	return srv, sock, logPath
}

// ctlRun runs gracefulctl with args and returns its output and exit code.
func ctlRun(ctx context.Context, ctl string, args ...string) (string, int, error) {
	out, err := exec.CommandContext(ctx, ctl, args...).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode(), nil
	}
	return string(out), 0, err
}

// waitServing waits until the process at sock is pid and serving, at most
// 20 s, and returns when it first saw it so.
func waitServing(t *testing.T, ctx context.Context, sock string, pid int) time.Time {
	t.Helper()
	var last string
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		st, err := control.Details(ctx, sock)
		if err == nil && st.PID == pid && st.Phase == graceful.PhaseServing {
			return time.Now()
		}
		last = "pid " + strconv.Itoa(st.PID) + " " + st.Phase.String()
		if err != nil {
			last = err.Error()
		}
	}
	t.Fatalf("pid %d is not serving at %s after 20 s (last: %s)", pid, sock, last)
	return time.Time{}
}

// TestCanaryJudgeKilled: the old process, which judges the canary, is
// SIGKILLed during the probation. The canary holds the listeners: it must
// become the serving process (unjudged, and it says so), with its PID
// file, instead of draining and leaving nothing listening. No connection is
// refused; what the killed process had in flight dies with it, and every
// request after the canary took over is answered. The orphan can upgrade
// again.
func TestCanaryJudgeKilled(t *testing.T) {
	const window = 4 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, ctl, bin := buildTools(t, ctx)
	srv, sock, _ := startCanaryServer(t, ctx, bin, window, "0.5")
	old := srv.PID()
	load := loadtest.StartLoad(srv.Addr, loadtest.Mix{KeepAliveGET: 8, FreshGET: 4})
	defer load.Stop()
	upgraded := make(chan string, 1)
	go func() {
		out, _, _ := ctlRun(ctx, ctl, "-socket", sock, "upgrade")
		upgraded <- out
	}()
	canary := waitCanary(t, ctx, sock)
	waitRequests(t, load, 200) // the canary serves its share
	require.NoError(t, syscall.Kill(old, syscall.SIGKILL))
	_, err := srv.WaitExit(ctx, old)
	require.NoError(t, err)
	t.Logf("upgrade command, its server killed: %s", <-upgraded)

	servingAt := waitServing(t, ctx, sock, canary)
	assert.Equal(t, canary, loadtest.ReadPIDFile(srv.PIDFile), "the PID file names the canary")
	srv.Follow()
	waitRequests(t, load, 500)
	st := load.Stop()
	t.Logf("requests %d, failures %v %v", st.Requests, st.Failures, st.Samples)
	assert.Zero(t, st.Failures["refused"], "no connection refused: %v", st.Samples)
	after, failedAfter := 0, 0
	for _, o := range st.Timeline {
		if o.At.Before(servingAt) {
			continue
		}
		after++
		if o.Failed {
			failedAfter++
		} else {
			assert.Equal(t, strconv.Itoa(canary), o.PID, "answered by the canary")
		}
	}
	assert.Positive(t, after)
	assert.Zero(t, failedAfter, "requests that failed once the canary served alone")

	// It is a whole server: it upgrades again (a probation judged on
	// traffic of its own), and nobody fails.
	load = loadtest.StartLoad(srv.Addr, loadtest.Mix{KeepAliveGET: 8, FreshGET: 4})
	defer load.Stop()
	waitRequests(t, load, 100)
	out, code, err := ctlRun(ctx, ctl, "-socket", sock, "upgrade")
	require.NoError(t, err)
	assert.Equal(t, 0, code, out)
	st = load.Stop()
	assert.Zero(t, st.Failed(), "%v %v", st.Failures, st.Samples)
	srv.Follow()
	assert.NotEqual(t, canary, srv.PID())
}
