package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/control"
	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestStalledCanaryNoHang: a canary that stops reading (SIGSTOP: a long GC
// pause, a frozen VM, a deadlocked receive loop) while the old process
// diverts new connections to it. The old process must give up on it by
// UpgradeTimeout and serve the connections it had sent and the canary never
// read; the upgrade must fail with ErrRolledBack. It must not hang on a send
// to a channel nobody reads (the old process keeps the canary's end open in
// p.plat.peer, so a full socket buffer never empties, even once tableflip
// has killed the canary).
func TestStalledCanaryNoHang(t *testing.T) {
	const upgradeTimeout = 8 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir, ctl, bin := buildTools(t, ctx)
	sock := filepath.Join(dir, "control.sock")
	logPath := filepath.Join(dir, "server.log")
	logs, err := os.Create(logPath)
	require.NoError(t, err)
	defer logs.Close()
	srv, err := loadtest.Start(ctx, loadtest.Config{Bin: bin, Dir: dir, Logs: logs, Args: []string{
		"-control", sock, "-upgrade-timeout", upgradeTimeout.String(), "-probation", "3s", "-canary-share", "1",
	}})
	require.NoError(t, err)
	var canary int
	defer func() {
		if canary != 0 {
			syscall.Kill(canary, syscall.SIGKILL)
		}
		srv.Kill()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("server logs:\n%s", b)
		}
	}()
	old := srv.PID()

	var out bytes.Buffer
	began := time.Now()
	upgrade := exec.CommandContext(ctx, ctl, "-socket", sock, "upgrade")
	upgrade.Stdout, upgrade.Stderr = &out, &out
	require.NoError(t, upgrade.Start())
	done := make(chan error, 1)
	go func() { done <- upgrade.Wait() }()

	// The window is open once the old process names the canary in its
	// status (the canary said its checks passed).
	canary = waitCanary(t, ctx, sock)
	require.NoError(t, syscall.Kill(canary, syscall.SIGSTOP))
	// Stopped for good before any connection is sent: kill returns before
	// the canary's threads have stopped, and one that read a connection
	// first would hold it until it is killed (a crash's in-flight loss,
	// which is not what this test is about).
	waitStopped(t, canary)

	// Every new connection goes to the canary (share 1): enough of them to
	// fill the hand-off channel's socket buffer.
	const n = 1000
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range n {
		c, err := net.Dial("tcp", srv.Addr)
		require.NoError(t, err)
		conns = append(conns, c)
		_, err = fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
		require.NoError(t, err)
	}

	// tableflip kills the canary at upgradeTimeout; the attempt must end
	// soon after.
	select {
	case err := <-done:
		var ee *exec.ExitError
		require.True(t, errors.As(err, &ee), "upgrade: %v: %s", err, out.String())
		assert.Regexp(t, `rolled back after [\d.]+s: it did not (take the connections handed to it|report its figures)`, out.String())
		assert.Less(t, time.Since(began), upgradeTimeout, "given up on at the verdict, not at UpgradeTimeout")
	case <-time.After(upgradeTimeout + 15*time.Second):
		t.Fatalf("the upgrade did not end %v after tableflip gave up on the stalled canary; gracefulctl said so far: %q", 15*time.Second, out.String())
	}

	// And every client the old process had sent to it is served after all.
	served, failed := 0, map[string]int{}
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			failed[err.Error()]++
			continue
		}
		if strings.HasPrefix(line, "HTTP/1.1 200") {
			served++
		} else {
			failed[line]++
		}
	}
	assert.Equal(t, n, served, "clients not served: %v", failed)
	assert.Equal(t, old, srv.PID())
	assert.Equal(t, old, loadtest.ReadPIDFile(srv.PIDFile))
}

// TestCanaryLeaves: a canary told to stop during its probation (SIGTERM)
// says so; the old process ends the window at once, takes back what the
// canary held, and the upgrade fails naming why. The clients see nothing.
// And the old process told to stop during a probation does not wait for
// the verdict: the canary drains with it, and both exit.
func TestCanaryLeaves(t *testing.T) {
	const window = 10 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, ctl, bin := buildTools(t, ctx)
	start := func(t *testing.T) (*loadtest.Server, string, string) {
		sdir := t.TempDir()
		sock := filepath.Join(sdir, "control.sock")
		logs, err := os.Create(filepath.Join(sdir, "server.log"))
		require.NoError(t, err)
		srv, err := loadtest.Start(ctx, loadtest.Config{Bin: bin, Dir: sdir, Logs: logs, Args: []string{
			"-control", sock, "-upgrade-timeout", "30s", "-probation", window.String(), "-canary-share", "0.5",
		}})
		require.NoError(t, err)
		t.Cleanup(func() {
			srv.Kill()
			logs.Close()
			if t.Failed() {
				b, _ := os.ReadFile(logs.Name())
				t.Logf("server logs:\n%s", b)
			}
		})
		return srv, sock, logs.Name()
	}
	upgrade := func(sock string) (<-chan string, time.Time) {
		res := make(chan string, 1)
		began := time.Now()
		go func() {
			out, _ := exec.CommandContext(ctx, ctl, "-socket", sock, "upgrade").CombinedOutput()
			res <- string(out)
		}()
		return res, began
	}

	t.Run("canary stopped", func(t *testing.T) {
		srv, sock, _ := start(t)
		old := srv.PID()
		load := loadtest.StartLoad(srv.Addr, loadtest.Mix{KeepAliveGET: 8, FreshGET: 4})
		res, began := upgrade(sock)
		canary := waitCanary(t, ctx, sock)
		waitRequests(t, load, 200) // requests during the window: it serves its share
		require.NoError(t, syscall.Kill(canary, syscall.SIGTERM))
		out := <-res
		took := time.Since(began)
		st := load.Stop()
		assert.Contains(t, out, "rolled back after")
		assert.Contains(t, out, "the new process is stopping (on signal terminated)")
		assert.Less(t, took, window, "the window ended when the canary left")
		assert.Equal(t, old, srv.PID())
		assert.Zero(t, st.Failed(), "%v %v", st.Failures, st.Samples)
		assert.Positive(t, st.PIDs[strconv.Itoa(canary)], "the canary served before it left")
	})

	t.Run("old process stopped", func(t *testing.T) {
		srv, sock, logPath := start(t)
		res, began := upgrade(sock)
		canary := waitCanary(t, ctx, sock)
		require.NoError(t, srv.Signal(syscall.SIGTERM))
		code, err := srv.WaitExit(ctx, srv.PID())
		require.NoError(t, err)
		assert.Equal(t, 0, code)
		assert.Less(t, time.Since(began), window, "no wait for the verdict")
		assert.Contains(t, <-res, "rolled back after")
		// The canary drained too, on its own: not killed.
		for i := 0; i < 1000 && loadtest.Alive(canary); i++ {
			time.Sleep(10 * time.Millisecond)
		}
		assert.False(t, loadtest.Alive(canary), "the canary exited")
		// Its log must not say what is false: it drained, it did not
		// serve on.
		b, err := os.ReadFile(logPath)
		require.NoError(t, err)
		assert.False(t, strings.Contains(string(b), "still serving"), "the old process was told to stop, yet its log says it serves on")
	})
}

// waitCanary waits until the server at sock has a new process on
// probation, and returns its PID.
func waitCanary(t *testing.T, ctx context.Context, sock string) int {
	t.Helper()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if st, err := control.Details(ctx, sock); err == nil && len(st.Upgrades) > 0 {
			if u := st.Upgrades[len(st.Upgrades)-1]; u.Outcome == graceful.OutcomeInProgress && u.NewPID != 0 {
				return u.NewPID
			}
		}
		select {
		case <-ctx.Done():
			t.Fatal("no probation window")
		case <-tick.C:
		}
	}
}

// waitStopped waits until every thread of process pid is stopped (state
// T in /proc), at most 10 s.
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	for i := 0; i < 10000; i++ {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		require.NoError(t, err)
		stopped := 0
		for _, task := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
			// The state follows the command's closing parenthesis.
			if s := string(b); err == nil && strings.Contains(s[strings.LastIndexByte(s, ')')+1:], " T ") {
				stopped++
			}
		}
		if stopped == len(tasks) {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("process %d did not stop", pid)
}
