package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestStatusLarge (issue 20 item 16): a binary path of 3,500 characters
// and 10 failed upgrades, each error naming it twice: status -json and
// deploy still work, and the server's answer stays within the 64 KiB that
// older clients read (each error cut, saying so).
func TestStatusLarge(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	e := newDeployEnv(t, ctx, map[string]string{"v2": ""})
	long := filepath.Dir(e.live)
	for len(long) < 3500 {
		long = filepath.Join(long, strings.Repeat("d", 200))
	}
	require.NoError(t, os.MkdirAll(long, 0o755))
	e.live = filepath.Join(long, "httpserver")
	require.NoError(t, os.WriteFile(e.live, e.content(e.bins["v1"]), 0o755))
	e.srv.Kill()
	e.start()
	require.Equal(t, "v1", e.served())

	require.NoError(t, os.Chmod(e.live, 0o644)) // every upgrade fails: permission denied
	for range 10 {
		out, code := e.run("upgrade")
		require.Equal(t, 1, code, out)
		require.Contains(t, out, "permission denied")
	}
	require.NoError(t, os.Chmod(e.live, 0o755))

	out, code := e.run("status", "-json")
	require.Equal(t, 0, code, out)
	var st graceful.Status
	require.NoError(t, json.Unmarshal([]byte(out), &st))
	assert.Equal(t, e.live, st.Executable)
	require.Len(t, st.Upgrades, 10)
	for _, u := range st.Upgrades {
		assert.Equal(t, graceful.OutcomeFailed, u.Outcome)
		assert.Contains(t, u.Err, "graceful: upgrade: ")
		assert.Regexp(t, `… \(\d+ more bytes\)$`, u.Err)
	}
	assert.Equal(t, 10, st.Totals.Failed)

	conn, err := net.Dial("unix", e.sock)
	require.NoError(t, err)
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	_, err = io.WriteString(conn, "status-json\n")
	require.NoError(t, err)
	raw, err := io.ReadAll(conn)
	require.NoError(t, err)
	assert.Less(t, len(raw), 64<<10, "within what older clients read")

	out, code = e.run("status")
	require.Equal(t, 0, code, out)
	assert.Contains(t, out, "upgrades: 0 succeeded, 10 failed")
	out, code = e.run("deploy", e.bins["v2"])
	require.Equal(t, 0, code, out)
	assert.Equal(t, "v2", e.served())
}

// TestControlIdleConnections (issue 20, also fix): 100 control-socket
// connections that never send a request do not hold the old process's
// exit after an upgrade (before: the 5 s request timeout); each is told to
// connect again.
func TestControlIdleConnections(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir, ctl, server := buildTools(t, ctx)
	sock := filepath.Join(dir, "control.sock")
	logs, err := os.Create(filepath.Join(dir, "server.log"))
	require.NoError(t, err)
	defer logs.Close()
	srv, err := loadtest.Start(ctx, loadtest.Config{Bin: server, Dir: dir, Logs: logs, Args: []string{"-control", sock}})
	require.NoError(t, err)
	defer srv.Kill()
	e := &deployEnv{t: t, ctx: ctx, ctl: ctl, sock: sock, srv: srv}

	idle := make([]net.Conn, 100)
	for i := range idle {
		idle[i], err = net.Dial("unix", sock)
		require.NoError(t, err)
		defer idle[i].Close()
	}
	// Answered after them: the old process has accepted every one.
	out, code := e.run("status")
	require.Equal(t, 0, code, out)

	old := srv.PID()
	out, code = e.run("upgrade")
	require.Equal(t, 0, code, out)
	answered := time.Now()
	exit, err := srv.WaitExit(ctx, old)
	require.NoError(t, err)
	assert.Equal(t, 0, exit)
	took := time.Since(answered)
	t.Logf("old process exited %v after the upgrade's answer", took.Round(time.Millisecond))
	assert.Less(t, took, 3500*time.Millisecond, "idle control connections do not hold the exit (request timeout 5 s)")
	for _, c := range idle[:3] {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		line, _ := bufio.NewReader(c).ReadString('\n')
		assert.Equal(t, "error graceful: control socket: no request before this process began to drain; connect again\n", line)
	}
	if t.Failed() {
		b, _ := os.ReadFile(logs.Name())
		t.Logf("server logs:\n%s", b)
	}
}
