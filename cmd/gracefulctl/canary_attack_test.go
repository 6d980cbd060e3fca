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
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestCanaryStalled: a canary that stops reading (SIGSTOP: a long GC
// pause, a frozen VM, a deadlocked receive loop) while the old process
// diverts new connections to it. The old process must give up on it by
// UpgradeTimeout and serve the connections it had sent and the canary never
// read; the upgrade must fail with ErrRolledBack. It must not hang on a send
// to a channel nobody reads (the old process keeps the canary's end open in
// p.plat.peer, so a full socket buffer never empties, even once tableflip
// has killed the canary).
func TestCanaryStalled(t *testing.T) {
	const upgradeTimeout = 8 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	ctl, err := loadtest.Build(ctx, dir, "github.com/graceful-go/graceful/cmd/gracefulctl", false)
	require.NoError(t, err)
	bin, err := loadtest.Build(ctx, dir, "github.com/graceful-go/graceful/examples/httpserver", false)
	require.NoError(t, err)
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
	upgrade := exec.CommandContext(ctx, ctl, "-socket", sock, "upgrade")
	upgrade.Stdout, upgrade.Stderr = &out, &out
	require.NoError(t, upgrade.Start())
	done := make(chan error, 1)
	go func() { done <- upgrade.Wait() }()

	// The window is open: the old process logs it once the canary said its
	// checks passed.
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		b, _ := os.ReadFile(logPath)
		if bytes.Contains(b, []byte("probation: the new process serves its share")) {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("no probation window")
		case <-tick.C:
		}
	}
	kids := loadtest.Children(old)
	require.Len(t, kids, 1)
	canary = kids[0]
	require.NoError(t, syscall.Kill(canary, syscall.SIGSTOP))

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
		assert.Contains(t, out.String(), "rolled back", out.String())
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
}
