package graceful_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/internal/loadtest"
)

// buildServer builds examples/httpserver once per test binary run, with
// the race detector when the tests have it.
func buildServer(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := loadtest.Build(ctx, t.TempDir(), "github.com/graceful-go/graceful/examples/httpserver", raceEnabled)
	require.NoError(t, err)
	return bin
}

// TestUpgradeUnderLoad upgrades the reference server 5 times while
// keep-alive GET and POST, fresh-connection and slow requests and SSE and
// WebSocket streams run: no request fails, no stream is cut, the PID changes
// each time and every old process exits on its own with status 0.
func TestUpgradeUnderLoad(t *testing.T) {
	bin := buildServer(t)
	dir := t.TempDir()
	logs := &syncBuffer{}
	ctx := context.Background()
	srv, err := loadtest.Start(ctx, loadtest.Config{Bin: bin, Dir: dir, Logs: logs, Env: []string{raceEnv}})
	require.NoError(t, err)
	t.Cleanup(func() {
		srv.Kill()
		if t.Failed() || os.Getenv("GRACEFUL_TEST_LOGS") != "" {
			t.Logf("server logs:\n%s", logs.String())
		}
	})

	load := loadtest.StartLoad(srv.Addr, loadtest.Mix{
		KeepAliveGET: 3, KeepAlivePOST: 3, FreshGET: 2, Slow: 2, SSE: 2, WS: 2,
		Pause: 5 * time.Millisecond,
	})
	stopped := false
	defer func() {
		if !stopped {
			load.Stop()
		}
	}()
	check := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	seen := map[int]bool{srv.PID(): true}
	for i := range 5 {
		before, _ := load.Snapshot()
		waitRequests(t, load, before+100) // traffic is flowing on this generation
		u, err := srv.Upgrade(ctx, 30*time.Second)
		require.NoError(t, err, "upgrade %d", i+1)
		t.Logf("upgrade %d: %d -> %d ready after %v, old exited after %v", i+1, u.OldPID, u.NewPID, u.Ready, u.OldExit)
		assert.Equal(t, 0, u.ExitCode, "old process %d exit code", u.OldPID)
		assert.False(t, seen[u.NewPID], "PID %d reused", u.NewPID)
		seen[u.NewPID] = true
		assert.Equal(t, u.NewPID, pidOf(t, check, "http://"+srv.Addr+"/"), "served by the new process")
	}
	before, _ := load.Snapshot()
	waitRequests(t, load, before+100)
	stats := load.Stop()
	stopped = true
	var report strings.Builder
	stats.Report(&report)
	t.Log(report.String())
	assert.Zero(t, stats.Failed(), "failures:\n%s", report.String())
	assert.Greater(t, stats.StreamsGraceful, 0, "streams ended gracefully")
	code, err := srv.Stop(ctx, 30*time.Second)
	require.NoError(t, err)
	assert.Equal(t, 0, code, "SIGTERM exit code")
}

func waitRequests(t *testing.T, l *loadtest.Load, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		got, _ := l.Snapshot()
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d requests done", got, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestRollback deploys broken new versions: each upgrade fails with an
// error naming the cause, the old process serves on with no failed request
// and no child left behind, and a good version then upgrades fine.
func TestRollback(t *testing.T) {
	cases := []struct {
		name   string
		deploy func(h *helper)
		want   string
	}{
		{"exits during start-up", func(h *helper) { h.setMode(modeExit) }, "exit status 3"},
		{"never ready", func(h *helper) { h.setMode(modeCheckFail) }, "timed out"},
		{"hangs", func(h *helper) { h.setMode(modeHang) }, "timed out"},
		{"missing", func(h *helper) { require.NoError(h.t, os.Remove(h.bin)) }, "no such file"},
		{"not executable", func(h *helper) { require.NoError(h.t, os.Chmod(h.bin, 0o644)) }, "permission denied"},
		{"garbage", func(h *helper) {
			require.NoError(h.t, loadtest.WriteExecutable(h.bin, strings.NewReader("\x7fELF garbage")))
		}, "exec format error"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := startHelper(t, []string{"-upgrade-timeout", "2s"}, loadtest.Config{})
			load := loadtest.StartLoad(h.Addr, loadtest.Mix{KeepAliveGET: 2, KeepAlivePOST: 2, FreshGET: 1, Pause: 5 * time.Millisecond})
			old := h.PID()
			waitRequests(t, load, 50) // traffic flows before the attempt
			tc.deploy(h)
			up := h.upgradeViaAPI()
			stats := load.Stop()
			assert.Contains(t, up.err, tc.want, "Upgrade's error names the cause")
			assert.Equal(t, old, h.PID())
			assert.Equal(t, old, loadtest.ReadPIDFile(h.PIDFile), "PID file still names the old process")
			h.noChildren()
			var report strings.Builder
			stats.Report(&report)
			assert.Zero(t, stats.Failed(), report.String())
			assert.Greater(t, stats.Requests, 0)

			h.deploy()
			h.setMode(modeOK)
			u, err := h.Upgrade(context.Background(), 20*time.Second)
			require.NoError(t, err)
			assert.NotEqual(t, old, u.NewPID)
			assert.Equal(t, 0, u.ExitCode)
		})
	}
}

// TestSecondUpgradeRefused asks for a second upgrade, by SIGHUP and by
// calling Process.Upgrade, while a slow-to-start new version gets ready:
// Upgrade returns ErrUpgradeInProgress at once, exactly one new process is
// started and takes over, and no request fails.
func TestSecondUpgradeRefused(t *testing.T) {
	h := startHelper(t, []string{"-upgrade-timeout", "10s"}, loadtest.Config{})
	load := loadtest.StartLoad(h.Addr, loadtest.Mix{KeepAliveGET: 2, KeepAlivePOST: 2, Pause: 5 * time.Millisecond})
	h.setMode(modeSlowReady)
	old := h.PID()
	require.NoError(t, h.Signal(syscall.SIGHUP))
	h.waitPhase(old, graceful.PhaseUpgrading)
	require.NoError(t, h.Signal(syscall.SIGHUP))
	start := time.Now()
	second := h.upgradeViaAPI()
	assert.Equal(t, old, second.pid)
	assert.Equal(t, refusedInProgress, second.refused, "Upgrade's error: %q", second.err)
	assert.Less(t, time.Since(start), time.Second, "refused at once, not queued behind the first (ready after 1.5 s)")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	code, err := h.WaitExit(ctx, old)
	require.NoError(t, err)
	assert.Equal(t, 0, code)
	stats := load.Stop()
	assert.Zero(t, stats.Failed())
	successor := loadtest.ReadPIDFile(h.PIDFile)
	assert.NotEqual(t, old, successor)
	h.waitEvent(successor, evReady)
	assert.Equal(t, []int{old, successor}, h.pidsWith(evStarted), "one new process started")
	assert.Equal(t, []int{old, successor}, h.pidsWith(evReady), "one successor became ready")
	assert.Empty(t, loadtest.Children(successor))

	// The successor refuses an upgrade only while its parent drains; now
	// it upgrades normally.
	h.setMode(modeOK)
	h.Follow()
	u, err := h.Server.Upgrade(context.Background(), 20*time.Second)
	require.NoError(t, err)
	assert.Equal(t, successor, u.OldPID)
}

// TestUnixAndUDPCarried carries a Unix-socket listener and a UDP socket
// across an upgrade; the socket file stays, and a stale one from a crashed
// process is replaced on a fresh start.
func TestUnixAndUDPCarried(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "http.sock")
	stale, err := net.Listen("unix", sock)
	require.NoError(t, err)
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close() // the file stays, nobody listens: a crashed server's leftover

	udpAddr, err := net.ResolveUDPAddr("udp", "127.0.0.1:0")
	require.NoError(t, err)
	probe, err := net.ListenUDP("udp", udpAddr)
	require.NoError(t, err)
	udp := probe.LocalAddr().String()
	probe.Close()

	h := startHelper(t, []string{"-unix", sock, "-udp", udp}, loadtest.Config{})
	unixClient := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}
	defer unixClient.CloseIdleConnections()
	old := h.PID()
	assert.Equal(t, old, pidOf(t, unixClient, "http://unix/"))
	assert.Equal(t, old, udpPID(t, udp))

	u, err := h.Upgrade(context.Background(), 20*time.Second)
	require.NoError(t, err)
	assert.Equal(t, 0, u.ExitCode)
	_, err = os.Stat(sock)
	require.NoError(t, err, "socket file kept across the upgrade")
	assert.Equal(t, u.NewPID, pidOf(t, unixClient, "http://unix/"))
	assert.Equal(t, u.NewPID, udpPID(t, udp))

	code, err := h.Stop(context.Background(), 20*time.Second)
	require.NoError(t, err)
	assert.Equal(t, 0, code)
	_, err = os.Stat(sock)
	assert.True(t, os.IsNotExist(err), "socket file removed after a drain without successor: %v", err)
}

// openFiles returns what the descriptors of process pid refer to
// ("socket:[inode]", paths...).
func openFiles(t *testing.T, pid int) []string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var out []string
	for _, e := range entries {
		if target, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil {
			out = append(out, target)
		}
	}
	return out
}

// fdTarget returns what f's descriptor refers to, as openFiles lists it.
// (Not f.Fd(): it would make the socket, shared with the server, blocking.)
func fdTarget(t *testing.T, f *os.File) string {
	t.Helper()
	rc, err := f.SyscallConn()
	require.NoError(t, err)
	var target string
	require.NoError(t, rc.Control(func(fd uintptr) {
		target, err = os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	}))
	require.NoError(t, err)
	return target
}

// environ returns the environment process pid was executed with.
func environ(t *testing.T, pid int) []string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	require.NoError(t, err)
	return strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")
}

func udpPID(t *testing.T, addr string) int {
	t.Helper()
	c, err := net.Dial("udp", addr)
	require.NoError(t, err)
	defer c.Close()
	buf := make([]byte, 256)
	// UDP may drop; retry a bounded number of times.
	for range 20 {
		_, err := c.Write([]byte("ping"))
		require.NoError(t, err)
		c.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
		n, err := c.Read(buf)
		if err != nil {
			continue
		}
		pid, rest, _ := strings.Cut(string(buf[:n]), " ")
		require.Equal(t, "ping", rest)
		p, err := strconv.Atoi(pid)
		require.NoError(t, err)
		return p
	}
	t.Fatal("no UDP echo")
	return 0
}

// TestSocketActivation passes a listening socket as fd 3 with LISTEN_FDS
// and LISTEN_PID as systemd does: it is served, then carried across an
// upgrade, and the variables do not leak to the next generation.
func TestSocketActivation(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	f, err := ln.(*net.TCPListener).File()
	require.NoError(t, err)
	addr := ln.Addr().String()
	ln.Close() // the socket lives on in f, then in the server

	h := startHelper(t, nil, loadtest.Config{
		Addr:       addr,
		ExtraFiles: []*os.File{f},
		Env:        []string{"LISTEN_FDS=1", "LISTEN_FDNAMES=web"},
		// systemd sets LISTEN_PID after fork; the shell's exec keeps its PID.
		Prefix: []string{"sh", "-c", `LISTEN_PID=$$ exec "$0" "$@"`},
	})
	socket := fdTarget(t, f)
	f.Close()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	assert.Equal(t, h.PID(), pidOf(t, c, "http://"+addr+"/"))
	assert.Contains(t, openFiles(t, h.PID()), socket, "the server adopted the socket it was passed")
	assert.Contains(t, environ(t, h.PID()), "LISTEN_FDS=1")

	u, err := h.Upgrade(context.Background(), 20*time.Second)
	require.NoError(t, err)
	assert.Equal(t, u.NewPID, pidOf(t, c, "http://"+addr+"/"))
	assert.Contains(t, openFiles(t, u.NewPID), socket, "the successor inherited the same socket")
	for _, kv := range environ(t, u.NewPID) {
		assert.False(t, strings.HasPrefix(kv, "LISTEN_"), "the successor was started with %s: it would adopt again", kv)
	}
	resp, err := c.Get("http://" + addr + "/env")
	require.NoError(t, err)
	env, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, string(env), "GRACEFUL_TEST_HELPER=1", "a handler's subprocess sees the environment")
	assert.NotContains(t, string(env), "LISTEN_", "activation variables are not passed on")
	assert.NotContains(t, string(env), "TABLEFLIP_", "tableflip's marker is not left for subprocesses")
}

// TestDrainDeadlineClosesHijacked holds a hijacked connection that ignores
// the drain: at DrainTimeout it is closed and the process exits 0.
func TestDrainDeadlineClosesHijacked(t *testing.T) {
	h := startHelper(t, []string{"-drain-timeout", "1s"}, loadtest.Config{})
	conn, err := net.Dial("tcp", h.Addr)
	require.NoError(t, err)
	defer conn.Close()
	_, err = conn.Write([]byte("GET /hijack HTTP/1.1\r\nHost: x\r\n\r\n"))
	require.NoError(t, err)
	r := bufio.NewReader(conn)
	for {
		line, err := r.ReadString('\n')
		require.NoError(t, err)
		if line == "hijacked\n" {
			break
		}
	}
	start := time.Now()
	code, err := h.Stop(context.Background(), 20*time.Second)
	require.NoError(t, err)
	assert.Equal(t, 0, code)
	assert.GreaterOrEqual(t, time.Since(start), time.Second, "the hijacked connection held the drain until the deadline")
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = r.ReadByte()
	assert.Error(t, err, "connection closed by the drain deadline")
}

// TestDrainDelayForLoadBalancers plays kubelet and load balancer: the
// balancer routes traffic while /readyz says 200; on SIGTERM readiness turns
// 503 while the listener still accepts, the balancer stops routing, and no
// request fails.
func TestDrainDelayForLoadBalancers(t *testing.T) {
	h := startHelper(t, []string{"-drain-delay", "700ms"}, loadtest.Config{})
	base := "http://" + h.Addr
	fresh := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	var routing atomic.Bool
	routing.Store(true)

	var wg sync.WaitGroup
	var served, failed atomic.Int32
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for routing.Load() {
				resp, err := fresh.Get(base + "/")
				if err != nil {
					failed.Add(1)
					t.Logf("request failed: %v", err)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					failed.Add(1)
				} else {
					served.Add(1)
				}
			}
		}()
	}
	waitFor(t, func() bool { return served.Load() > 20 })

	require.NoError(t, h.Signal(syscall.SIGTERM))
	saw503, refused := 0, false
	deadline := time.Now().Add(10 * time.Second)
	for !refused && time.Now().Before(deadline) {
		resp, err := fresh.Get(base + "/readyz")
		switch {
		case err != nil:
			// Refused; or reset when the probe's connection was still in
			// the accept queue as the listener closed.
			assert.True(t, errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET), "probe error: %v", err)
			refused = true
		case resp.StatusCode == http.StatusServiceUnavailable:
			resp.Body.Close()
			saw503++
			routing.Store(false) // the balancer takes the pod out of rotation
		default:
			resp.Body.Close()
			require.Zero(t, saw503, "readiness came back after turning 503")
		}
		time.Sleep(20 * time.Millisecond) // the probe period
	}
	routing.Store(false)
	wg.Wait()
	assert.True(t, refused, "the listener closed in the end")
	assert.Greater(t, saw503, 1, "readiness answered 503 while the listener still accepted")
	assert.Zero(t, failed.Load(), "requests failed")
	code, err := h.WaitExit(context.Background(), h.PID())
	require.NoError(t, err)
	assert.Equal(t, 0, code)
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
