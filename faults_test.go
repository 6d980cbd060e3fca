//go:build linux

package graceful_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/control"
	"github.com/graceful-go/graceful/internal/loadtest"
)

// runHelper runs the helper to completion (it must fail to start) and
// returns its exit code and output.
func runHelper(t *testing.T, args, env []string) (int, string) {
	t.Helper()
	self, err := os.Executable()
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, self, args...)
	cmd.Env = append(append(os.Environ(), raceEnv, "GRACEFUL_TEST_HELPER=1"), env...)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee, "the helper should have failed:\n%s", out)
	return ee.ExitCode(), string(out)
}

// TestFaultPortTaken: a fresh start on a port another process holds fails
// at once with an error naming the address, and leaves nothing behind.
func TestFaultPortTaken(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	pidfile := filepath.Join(t.TempDir(), "server.pid")
	code, out := runHelper(t, []string{"-addr", ln.Addr().String(), "-pidfile", pidfile}, nil)
	assert.Equal(t, 1, code)
	assert.Contains(t, out, "listen tcp "+ln.Addr().String())
	assert.Contains(t, out, "address already in use")
	assert.NoFileExists(t, pidfile)
}

// TestFaultPIDFileDirectory: a PID file whose directory is missing or not
// a directory is a clear error from New, before anything listens.
func TestFaultPIDFileDirectory(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "a-file")
	require.NoError(t, os.WriteFile(file, nil, 0o644))
	cases := map[string]string{
		"missing":       filepath.Join(dir, "missing", "server.pid"),
		"not directory": filepath.Join(file, "server.pid"),
	}
	if os.Geteuid() != 0 { // root writes to read-only directories
		ro := filepath.Join(dir, "ro")
		require.NoError(t, os.Mkdir(ro, 0o555))
		cases["read-only"] = filepath.Join(ro, "server.pid")
	}
	for name, path := range cases {
		t.Run(name, func(t *testing.T) {
			code, out := runHelper(t, []string{"-pidfile", path}, nil)
			assert.Equal(t, 1, code)
			assert.Contains(t, out, "PID file directory "+filepath.Dir(path)+" is not writable")
		})
	}
}

// TestFaultBogusProtocolVariables: variables of the fd-passing protocol
// (tableflip's) set by hand, without a parent, make New fail with an error
// instead of adopting stray descriptors.
func TestFaultBogusProtocolVariables(t *testing.T) {
	code, out := runHelper(t, nil, []string{"TABLEFLIP_HAS_PARENT_7DIU3=yes"})
	assert.Equal(t, 1, code)
	assert.Contains(t, out, "TABLEFLIP_HAS_PARENT_7DIU3 is set but descriptor 3 is not a pipe from a parent process")
}

// TestFaultUpgradeStorm sends 50 SIGHUPs within a second, each to whichever
// process serves at that moment, and among them 10 calls of
// Process.Upgrade through the helper's API: upgrades run one at a time
// (never more than two generations alive at once; the calls that overlap
// an upgrade or a drain are refused at once with a sentinel error), no
// request fails, and in the end one process serves with no child and every
// previous generation exited 0.
func TestFaultUpgradeStorm(t *testing.T) {
	h := startHelper(t, nil, loadtest.Config{})
	load := loadtest.StartLoad(h.Addr, loadtest.Mix{KeepAliveGET: 2, KeepAlivePOST: 2, FreshGET: 1, Pause: 2 * time.Millisecond})
	waitRequests(t, load, 50)
	first := h.PID()
	// Two generations at most: a serving one and the child it starts, or a
	// draining one and its successor, which refuses to upgrade meanwhile.
	maxAlive := 0
	alive := func(except int) int {
		n := 0
		for _, pid := range h.pidsWith(evStarted) {
			if pid != except && loadtest.Alive(pid) {
				n++
			}
		}
		return n
	}
	var calls sync.WaitGroup
	answers := make(chan upgradeAnswer, 10)
	for i := range 50 {
		if pid := loadtest.ReadPIDFile(h.PIDFile); pid > 0 {
			syscall.Kill(pid, syscall.SIGHUP)
		}
		if i%5 == 2 {
			calls.Go(func() {
				a, err := postUpgrade(h.Addr)
				if err != nil {
					a.err = "request failed: " + err.Error()
				}
				answers <- a
			})
		}
		maxAlive = max(maxAlive, alive(0))
		time.Sleep(20 * time.Millisecond)
	}
	calls.Wait()
	close(answers)
	// Follow the generations to the end: the one the PID file names serves,
	// with no child, and every other has exited.
	deadline := time.Now().Add(20 * time.Second)
	var final int
	for {
		maxAlive = max(maxAlive, alive(0))
		final = loadtest.ReadPIDFile(h.PIDFile)
		pid, phase, err := h.phase()
		if final != first && alive(final) == 0 && len(loadtest.Children(final)) == 0 &&
			err == nil && pid == final && phase == graceful.PhaseServing.String() {
			break
		}
		require.True(t, time.Now().Before(deadline), "the storm did not settle")
		time.Sleep(20 * time.Millisecond)
	}
	h.Follow()
	before, _ := load.Snapshot()
	waitRequests(t, load, before+50)
	stats := load.Stop()
	var report strings.Builder
	stats.Report(&report)
	assert.Zero(t, stats.Failed(), report.String())

	refused := 0
	for a := range answers {
		switch a.refused {
		case refusedInProgress, refusedDraining:
			refused++
		case refusedNotReady: // a successor asked before it declared itself ready
		default:
			assert.Empty(t, a.err, "an upgrade failed other than by a refusal")
		}
	}
	h.waitEvent(final, evReady)
	generations := h.pidsWith(evReady)
	t.Logf("%d upgrades done, %d of 10 API calls refused, at most %d generations alive at once", len(generations)-1, refused, maxAlive)
	assert.Equal(t, h.pidsWith(evStarted), generations, "every new process started became ready")
	assert.GreaterOrEqual(t, len(generations)-1, 2)
	assert.LessOrEqual(t, maxAlive, 2, "an upgrade started over another one or over a draining generation")
	assert.Positive(t, refused, "overlapping requests are refused")
	require.Equal(t, final, generations[len(generations)-1])
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, pid := range generations[:len(generations)-1] { // all exited: alive(final) was 0
		code, err := h.WaitExit(ctx, pid)
		require.NoError(t, err)
		assert.Equal(t, 0, code, "generation %d exit code", pid)
	}
}

// TestFaultPanicDuringDrain: a handler that panics during the drain costs
// its own request (net/http recovers the panic and closes that connection;
// nothing can answer it) and nothing else: other requests are answered and
// the process drains and exits 0.
func TestFaultPanicDuringDrain(t *testing.T) {
	// The request during the drain reuses an idle connection: a long
	// IdleGrace keeps it open for that request however slow the machine.
	h := startHelper(t, []string{"-idle-grace", "10s"}, loadtest.Config{})
	c := &http.Client{Timeout: 10 * time.Second}
	panicked := make(chan error, 1)
	go func() {
		resp, err := c.Get("http://" + h.Addr + "/panic")
		if err == nil {
			resp.Body.Close()
		}
		panicked <- err
	}()
	pid := h.PID()
	h.waitEvent(pid, evPanicWaiting)
	rc := dialRaw(t, h.Addr)
	rc.send("/")
	assert.Equal(t, http.StatusOK, rc.response().StatusCode)
	require.NoError(t, h.Signal(syscall.SIGTERM))
	h.waitEvent(pid, evDraining)
	rc.send("/") // a request during the drain is still answered
	assert.Equal(t, http.StatusOK, rc.response().StatusCode)
	assert.Error(t, <-panicked, "the panicking request itself fails")
	code, err := h.WaitExit(context.Background(), pid)
	require.NoError(t, err)
	assert.Equal(t, 0, code)
	assert.Contains(t, h.pidsWith(evPanicking), pid, "the handler reached its panic")
}

// TestFaultKillOldMidDrain kills the old process with SIGKILL while it
// drains requests in flight. Those requests die with it (physically: the
// only process that knew them is gone); the new process, already serving,
// answers every request sent after, and nothing is left running but it.
func TestFaultKillOldMidDrain(t *testing.T) {
	h := startHelper(t, []string{"-drain-timeout", "20s"}, loadtest.Config{})
	old := h.PID()
	slow := h.upgradeDuringSlowRequest(10000)
	require.NoError(t, syscall.Kill(old, syscall.SIGKILL))
	_, err := h.WaitExit(context.Background(), old)
	require.NoError(t, err)
	assert.Error(t, <-slow, "the request in flight in the killed process fails")
	h.Follow()
	successor := h.PID()
	require.NotEqual(t, old, successor)
	load := loadtest.StartLoad(h.Addr, loadtest.Mix{KeepAliveGET: 2, KeepAlivePOST: 2, FreshGET: 1})
	waitRequests(t, load, 100)
	stats := load.Stop()
	assert.Zero(t, stats.Failed())
	assert.Equal(t, []string{strconv.Itoa(successor)}, keys(stats.PIDs), "the successor answers everything")
	assert.Empty(t, loadtest.Children(successor))
	// The successor noticed that its parent is gone and accepts upgrades
	// again: Upgrade is not refused, and the successor hands over and exits.
	up := h.upgradeViaAPI()
	require.Empty(t, up.err, "the successor refused to upgrade (%s)", up.refused)
	assert.Equal(t, successor, up.pid)
	code, err := h.WaitExit(context.Background(), successor)
	require.NoError(t, err)
	assert.Equal(t, 0, code)
	h.Follow()
	assert.NotEqual(t, successor, h.PID())
}

// TestFaultFewDescriptors: with RLIMIT_NOFILE nearly used up by open
// connections, an upgrade fails with an error naming the cause ("too many
// open files") and the old process keeps serving the connections it has.
func TestFaultFewDescriptors(t *testing.T) {
	h := startHelper(t, []string{"-nofile", "64"}, loadtest.Config{})
	var conns []*rawConn
	for {
		rc := dialRaw(t, h.Addr)
		rc.send("/")
		rc.c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		resp, err := http.ReadResponse(rc.r, nil)
		if err != nil {
			rc.c.Close() // the server could not accept it: the limit is reached
			break
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		conns = append(conns, rc)
		require.Less(t, len(conns), 64, "the limit never bit")
	}
	// Ask for the upgrade on a connection we hold: no descriptor is free.
	up := conns[0]
	up.c.SetDeadline(time.Now().Add(20 * time.Second))
	_, err := io.WriteString(up.c, "POST /upgrade HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
	require.NoError(t, err)
	resp, err := http.ReadResponse(up.r, nil)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusInternalServerError, resp.StatusCode)
	assert.Contains(t, string(body), "too many open files")
	t.Logf("upgrade refused: %s", body)
	for i, rc := range conns {
		rc.c.SetDeadline(time.Now().Add(10 * time.Second))
		rc.send("/")
		resp, err := http.ReadResponse(rc.r, nil)
		require.NoError(t, err, "connection %d", i)
		assert.Equal(t, http.StatusOK, resp.StatusCode)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	h.noChildren()
}

// TestNoDescriptorLeakToSubprocess: a subprocess that a handler starts,
// before and after an upgrade, holds no socket of the server: listeners,
// the hand-off channel and the inherited sockets are all close-on-exec.
func TestNoDescriptorLeakToSubprocess(t *testing.T) {
	h := startHelper(t, nil, loadtest.Config{})
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	fds := func() string {
		resp, err := c.Get("http://" + h.Addr + "/fds")
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		require.Equal(t, http.StatusOK, resp.StatusCode, string(b))
		return string(b)
	}
	assert.NotContains(t, fds(), "socket:", "before any upgrade")
	// (Its pipes are the subprocess's own stdout and stderr.)
	_, err := h.Upgrade(context.Background(), 20*time.Second)
	require.NoError(t, err)
	assert.NotContains(t, fds(), "socket:", "in the successor")
}

func keys(m map[string]int) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestFaultPanicAfterReady deploys a version that passes its checks,
// declares itself ready, then panics while the old process drains. The old
// process has already handed over and exits 0 (an upgrade is not undone
// once the successor is ready), so after the panic nothing serves: requests
// are refused until a supervisor restarts the service. What graceful
// guarantees is that the old process drained cleanly and that the failure
// is visible to a supervisor: the successor exits with a panic's status.
func TestFaultPanicAfterReady(t *testing.T) {
	h := startHelper(t, nil, loadtest.Config{})
	old := h.PID()
	h.setMode(modePanic)
	u, err := h.Upgrade(context.Background(), 20*time.Second)
	require.NoError(t, err, "the new version was ready")
	assert.Equal(t, 0, u.ExitCode, "the old process drained and exited cleanly")
	assert.NotEqual(t, old, u.NewPID)
	code, err := h.WaitExit(context.Background(), u.NewPID)
	require.NoError(t, err)
	assert.Equal(t, 2, code, "a Go panic exits 2")
	assert.Contains(t, h.pidsWith(evPanicking), u.NewPID, "it exited by the panic it was told to make")
	_, err = net.Dial("tcp", h.Addr)
	assert.ErrorIs(t, err, syscall.ECONNREFUSED, "nothing serves any more")
}

// TestPIDFileMode: the PID file is written whole (never empty or partial)
// with mode 0644 and owned by the server's user.
func TestPIDFileMode(t *testing.T) {
	h := startHelper(t, nil, loadtest.Config{})
	fi, err := os.Stat(h.PIDFile)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o644), fi.Mode().Perm())
	assert.Equal(t, uint32(os.Geteuid()), fi.Sys().(*syscall.Stat_t).Uid)
	b, err := os.ReadFile(h.PIDFile)
	require.NoError(t, err)
	assert.Equal(t, strconv.Itoa(h.PID())+"\n", string(b))
}

// TestFaultSuccessorStoppedBeforeReady stops a new version (SIGTERM) while
// its pre-ready checks run: it drains and exits without becoming ready, the
// upgrade fails with that exit, and the old process serves on, with its
// Unix socket and control socket files still in place (the new process must
// not remove sockets it only inherited).
func TestFaultSuccessorStoppedBeforeReady(t *testing.T) {
	dir := t.TempDir()
	sock, ctl := filepath.Join(dir, "http.sock"), filepath.Join(dir, "control.sock")
	h := startHelper(t, []string{"-unix", sock, "-control", ctl}, loadtest.Config{})
	old := h.PID()
	h.setMode(modeCheckFail)
	answer := make(chan upgradeAnswer, 1)
	go func() {
		a, err := postUpgrade(h.Addr)
		if err != nil {
			a.err = err.Error()
		}
		answer <- a
	}()
	child := h.waitNewPID(old, evChecking)
	require.NoError(t, syscall.Kill(child, syscall.SIGTERM))
	a := <-answer
	assert.Equal(t, old, a.pid)
	assert.Contains(t, a.err, "exited", "the upgrade failed with the new process's exit")
	h.noChildren()

	for _, f := range []string{sock, ctl} {
		_, err := os.Stat(f)
		assert.NoError(t, err, "%s is still there", f)
	}
	unixClient := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}
	defer unixClient.CloseIdleConnections()
	assert.Equal(t, old, pidOf(t, unixClient, "http://unix/"), "the old process serves on its Unix socket")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	msg, err := control.Status(ctx, ctl)
	require.NoError(t, err)
	assert.Equal(t, "pid "+strconv.Itoa(old)+" serving", msg)
}

// TestFaultOldFrozenMidDrain freezes the old process (SIGSTOP) while it
// drains a slow request, then stops the new one (SIGTERM): the new
// process's drain is bounded by its own DrainTimeout whatever the old one
// does (service managers size their stop timeouts on it), and it exits 0.
// Resumed, the old one ends its own drain at its deadline and exits 0.
func TestFaultOldFrozenMidDrain(t *testing.T) {
	h := startHelper(t, []string{"-drain-timeout", "3s"}, loadtest.Config{})
	old := h.PID()
	slow := h.upgradeDuringSlowRequest(20000)
	h.Follow()
	successor := h.PID()
	require.NotEqual(t, old, successor)
	require.NoError(t, syscall.Kill(old, syscall.SIGSTOP))
	defer syscall.Kill(old, syscall.SIGCONT)

	require.NoError(t, syscall.Kill(successor, syscall.SIGTERM))
	// The successor is the frozen process's child: it cannot be waited for,
	// but once it has exited it is a zombie. Its drain deadline is 3 s; 15 s
	// is only where the test gives up.
	for i := 0; loadtest.Alive(successor); i++ {
		require.Less(t, i, 1500, "the new process's drain waited for its frozen parent")
		time.Sleep(10 * time.Millisecond)
	}
	require.NoError(t, syscall.Kill(old, syscall.SIGCONT))
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	code, err := h.WaitExit(ctx, old)
	require.NoError(t, err)
	assert.Equal(t, 0, code)
	assert.Error(t, <-slow, "the slow request outlived the old process's drain deadline")
}

// TestFaultSlowloris: keep-alive clients that send 1, 2 or 3 bytes of their
// next request and stall (fewer than the 4 net/http waits for before its
// header timer starts) must not hold the drain to its 60 s deadline, nor
// refuse upgrades meanwhile: once the drain begins, a request has IdleGrace
// (1 s; ReadHeaderTimeout when the server sets one) to arrive, then its
// connection gets a FIN. Without a successor and at an upgrade.
func TestFaultSlowloris(t *testing.T) {
	for _, signal := range []syscall.Signal{syscall.SIGTERM, syscall.SIGHUP} {
		t.Run(signal.String(), func(t *testing.T) {
			h := startHelper(t, []string{"-drain-timeout", "60s"}, loadtest.Config{})
			old := h.PID()
			var stalled []*rawConn
			for n := 1; n <= 3; n++ {
				rc := dialRaw(t, h.Addr)
				rc.send("/")
				assert.Equal(t, http.StatusOK, rc.response().StatusCode)
				_, err := io.WriteString(rc.c, "GET"[:n])
				require.NoError(t, err)
				stalled = append(stalled, rc)
			}
			require.NoError(t, h.Signal(signal))
			// 60 s would be the drain deadline; 30 s is where the test gives up.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			code, err := h.WaitExit(ctx, old)
			require.NoError(t, err, "the stalled requests held the drain")
			assert.Equal(t, 0, code)
			for i, rc := range stalled {
				_, err := rc.r.ReadByte()
				assert.ErrorIs(t, err, io.EOF, "stalled client %d: closed with a FIN", i+1)
			}
			if signal == syscall.SIGHUP {
				h.Follow()
				up := h.upgradeViaAPI()
				assert.Empty(t, up.err, "the successor upgrades again once the old process is gone")
				h.Follow()
			}
		})
	}
}

// splitFirstWrite sends its first write in two parts, the first 2 bytes,
// then the rest a moment later: an HTTP/2 client whose connection preface
// reaches the server split.
type splitFirstWrite struct {
	net.Conn
	done bool
}

func (c *splitFirstWrite) Write(b []byte) (int, error) {
	if c.done || len(b) < 3 {
		return c.Conn.Write(b)
	}
	c.done = true
	n, err := c.Conn.Write(b[:2])
	if err != nil {
		return n, err
	}
	time.Sleep(50 * time.Millisecond) // the split itself, what this client does
	m, err := c.Conn.Write(b[2:])
	return n + m, err
}

// TestFaultH2CSplitPreface: an h2c (HTTP/2 prior knowledge) client whose
// preface arrives split after 2 bytes is still recognised as HTTP/2: at an
// upgrade its connection gets GOAWAY (it is not handed to the successor as
// if it were HTTP/1, nor held to the drain deadline), and its next requests
// succeed, on a new connection to the new process.
func TestFaultH2CSplitPreface(t *testing.T) {
	h := startHelper(t, []string{"-h2c", "-drain-timeout", "30s"}, loadtest.Config{})
	old := h.PID()
	tr := &http.Transport{
		Protocols: new(http.Protocols),
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &splitFirstWrite{Conn: c}, nil
		},
	}
	tr.Protocols.SetUnencryptedHTTP2(true)
	defer tr.CloseIdleConnections()
	c := &http.Client{Timeout: 10 * time.Second, Transport: tr}
	get := func() (int, error) {
		resp, err := c.Get("http://" + h.Addr + "/")
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body)
		if resp.ProtoMajor != 2 {
			return 0, fmt.Errorf("served over %s", resp.Proto)
		}
		return strconv.Atoi(resp.Header.Get("X-Pid"))
	}
	pid, err := get()
	require.NoError(t, err)
	require.Equal(t, old, pid)

	require.NoError(t, h.Signal(syscall.SIGHUP))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	code, err := h.WaitExit(ctx, old)
	require.NoError(t, err, "the old process was held by the h2c connection")
	assert.Equal(t, 0, code)
	h.Follow()
	for i := range 5 {
		pid, err := get()
		require.NoError(t, err, "request %d after the upgrade", i+1)
		assert.Equal(t, h.PID(), pid)
	}
}

// TestFaultSuccessorStallsAtHandOff: with 1,000 idle keep-alive connections,
// the new process is frozen (SIGSTOP) for 2 s right after it became ready,
// as a long GC pause or a starved CPU would. The old process's hand-off
// waits for it (up to its drain deadline) instead of closing what does not
// fit in the channel: every connection is handed over, and every client's
// next request on its own connection is answered by the new process.
func TestFaultSuccessorStallsAtHandOff(t *testing.T) {
	const idle = 1000
	h := startHelper(t, []string{"-drain-timeout", "20s"}, loadtest.Config{})
	old := h.PID()
	conns := make([]*rawConn, idle)
	for i := range conns {
		conns[i] = dialRaw(t, h.Addr)
		conns[i].send("/")
	}
	for _, rc := range conns {
		require.Equal(t, http.StatusOK, rc.response().StatusCode)
	}
	require.NoError(t, h.Signal(syscall.SIGHUP))
	successor := h.waitNewPID(old, evReady)
	require.NoError(t, syscall.Kill(successor, syscall.SIGSTOP))
	time.Sleep(2 * time.Second) // the stall itself
	require.NoError(t, syscall.Kill(successor, syscall.SIGCONT))

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code, err := h.WaitExit(ctx, old)
	require.NoError(t, err)
	assert.Equal(t, 0, code)
	failed, fromOld := 0, 0
	for _, rc := range conns {
		if _, err := io.WriteString(rc.c, "GET / HTTP/1.1\r\nHost: test\r\n\r\n"); err != nil {
			failed++
			continue
		}
		resp, err := http.ReadResponse(rc.r, nil)
		if err != nil {
			failed++
			continue
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.Header.Get("X-Pid") != strconv.Itoa(successor) {
			fromOld++
		}
	}
	assert.Zero(t, failed, "clients whose next request failed (of %d)", idle)
	assert.Zero(t, fromOld, "answers not from the new process")
	h.Follow()
}

// TestFaultStopDuringUpgrade sends SIGTERM to the old process while the new
// one runs its pre-ready checks (1.5 s). The old one waits for the outcome
// instead of killing a new process that may already accept: once it is
// ready, the old one hands over its idle connections and asks it to drain
// too. Both exit 0, the service stops as asked, the PID file is gone (it
// never names a dead process), and an idle client gets a FIN from the new
// process, not a reset.
func TestFaultStopDuringUpgrade(t *testing.T) {
	h := startHelper(t, []string{"-upgrade-timeout", "10s"}, loadtest.Config{})
	old := h.PID()
	idle := dialRaw(t, h.Addr)
	idle.send("/")
	require.Equal(t, http.StatusOK, idle.response().StatusCode)
	h.setMode(modeSlowReady)
	require.NoError(t, h.Signal(syscall.SIGHUP))
	successor := h.waitNewPID(old, evChecking)
	require.NoError(t, h.Signal(syscall.SIGTERM))

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	code, err := h.WaitExit(ctx, old)
	require.NoError(t, err)
	assert.Equal(t, 0, code)
	code, err = h.WaitExit(ctx, successor) // ours to wait for once its parent is gone
	require.NoError(t, err, "the new process was not asked to drain")
	assert.Equal(t, 0, code)
	assert.Contains(t, h.pidsWith(evReady), successor, "the new process became ready: it was not killed")
	_, err = os.Stat(h.PIDFile)
	assert.ErrorIs(t, err, os.ErrNotExist, "the PID file names nobody once the service stopped")
	_, err = idle.r.ReadByte()
	assert.ErrorIs(t, err, io.EOF, "the idle connection was closed with a FIN")
}

// TestFaultSIGTERMRacesReady sends SIGTERM 0-12 ms after SIGHUP, 10 times,
// while 4 clients send requests back to back on connections the server
// accepted before: whatever the interleaving, both generations exit 0, no
// process is left, the PID file does not name a dead process, and no
// accepted connection is dropped: each client's last response says
// "Connection: close", and nothing fails before it. (Connections still in
// the listen queue when the last listener closes are reset by the kernel;
// that is the service stopping, not a connection a server accepted.)
func TestFaultSIGTERMRacesReady(t *testing.T) {
	for i := range 10 {
		h := startHelper(t, nil, loadtest.Config{})
		old := h.PID()
		const clients = 4
		outcome := make(chan string, clients)
		for range clients {
			rc := dialRaw(t, h.Addr)
			rc.send("/")
			require.Equal(t, http.StatusOK, rc.response().StatusCode)
			go func() {
				last := strconv.Itoa(old)
				for n := 1; ; n++ {
					if _, err := io.WriteString(rc.c, "GET / HTTP/1.1\r\nHost: test\r\n\r\n"); err != nil {
						outcome <- fmt.Sprintf("request %d, write: %v (last answer from pid %s)", n, err, last)
						return
					}
					resp, err := http.ReadResponse(rc.r, nil)
					if err != nil {
						outcome <- fmt.Sprintf("request %d, read: %v (last answer from pid %s)", n, err, last)
						return
					}
					last = resp.Header.Get("X-Pid")
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.Close {
						outcome <- "" // told to close: the server is done with it
						return
					}
				}
			}()
		}
		require.NoError(t, h.Signal(syscall.SIGHUP))
		time.Sleep(time.Duration(i*12/9) * time.Millisecond) // the interleaving under test
		require.NoError(t, h.Signal(syscall.SIGTERM))
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		code, err := h.WaitExit(ctx, old)
		require.NoError(t, err)
		assert.Equal(t, 0, code, "run %d: old process", i)
		for _, pid := range h.pidsWith(evStarted) {
			if pid == old {
				continue
			}
			// A new process, ready or not, is ours once its parent is gone.
			code, err := h.WaitExit(ctx, pid)
			require.NoError(t, err, "run %d: the new process %d did not stop", i, pid)
			assert.Equal(t, 0, code, "run %d: new process %d", i, pid)
		}
		cancel()
		for range clients {
			assert.Empty(t, <-outcome, "run %d: an accepted connection failed", i)
		}
		if pid := loadtest.ReadPIDFile(h.PIDFile); pid != 0 {
			assert.True(t, loadtest.Alive(pid), "run %d: the PID file names dead process %d", i, pid)
		}
	}
}

// upgradeDuringSlowRequest sends GET /slow?ms=ms to the serving process,
// upgrades it (SIGHUP) once the request is in its handler, and returns once
// the old process drains it, the successor being ready. The channel gets
// the request's outcome.
func (h *helper) upgradeDuringSlowRequest(ms int) <-chan error {
	h.t.Helper()
	old := h.PID()
	slow := make(chan error, 1)
	go func() {
		c := &http.Client{Timeout: time.Duration(ms)*time.Millisecond + 10*time.Second}
		resp, err := c.Get("http://" + h.Addr + "/slow?ms=" + strconv.Itoa(ms))
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		slow <- err
	}()
	h.waitEvent(old, evSlowStarted)
	require.NoError(h.t, h.Signal(syscall.SIGHUP))
	h.waitEvent(old, evDraining)
	return slow
}

// TestFaultH2GoodbyeBeforeGoaway: an h2c client reopens its stream each
// time it is told goodbye, while an HTTP/1 request keeps the old process's
// keep-alive retirement (and so its Shutdown) going for 1.5 s after an
// upgrade. A stream told goodbye before its connection's GOAWAY would be
// reopened on the same connection, to the draining process, and told
// goodbye again, in a loop (44,280 times in 1.2 s, found by review); told
// at the GOAWAY, the client reopens it on a new connection, to the new
// process.
func TestFaultH2GoodbyeBeforeGoaway(t *testing.T) {
	h := startHelper(t, []string{"-h2c", "-drain-timeout", "20s"}, loadtest.Config{})
	old := h.PID()
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	defer tr.CloseIdleConnections()
	streams := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	var mu sync.Mutex
	byPID := map[string]int{}
	stop := make(chan struct{})
	done := make(chan error, 1)
	opened := make(chan struct{}, 1)
	go func() {
		for {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			resp, err := streams.Get("http://" + h.Addr + "/stream")
			if err != nil {
				done <- err
				return
			}
			mu.Lock()
			byPID[resp.Header.Get("X-Pid")]++
			mu.Unlock()
			select {
			case opened <- struct{}{}:
			default:
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
	<-opened // a stream is open on the old process
	slow := h.upgradeDuringSlowRequest(1500)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code, err := h.WaitExit(ctx, old)
	require.NoError(t, err)
	assert.Equal(t, 0, code)
	require.NoError(t, <-slow, "the HTTP/1 request in flight is answered")
	h.Follow()
	close(stop)
	// The stream open on the new process ends at its goodbye: stop it.
	require.NoError(t, h.Signal(syscall.SIGTERM))
	require.NoError(t, <-done)
	mu.Lock()
	defer mu.Unlock()
	assert.LessOrEqual(t, byPID[strconv.Itoa(old)], 2, "streams opened on the old process (%v)", byPID)
	assert.Positive(t, byPID[strconv.Itoa(h.PID())], "the stream reopened on the new process")
}

// TestFaultManyFailedUpgrades: upgrades that fail before the new process
// reads what it is passed (here its binary is missing) leave nothing
// behind on the hand-off channel. Queued there, 54 such attempts filled it
// and the next one hung forever. After 100, an upgrade succeeds and the new
// process has the whole record.
func TestFaultManyFailedUpgrades(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "control.sock")
	h := startHelper(t, []string{"-control", sock}, loadtest.Config{})
	require.NoError(t, os.Remove(h.bin))
	for i := range 100 {
		require.Contains(t, h.upgradeViaAPI().err, "no such file", "attempt %d", i)
	}
	h.deploy()
	require.Empty(t, h.upgradeViaAPI().err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The new process records its upgrade as it declares itself serving,
	// a moment after its parent learnt it was ready.
	var st graceful.Status
	for i := 0; i < 200 && st.Phase != graceful.PhaseServing; i++ {
		var err error
		st, err = control.Details(ctx, sock)
		require.NoError(t, err)
		time.Sleep(5 * time.Millisecond)
	}
	assert.Equal(t, 2, st.Generation)
	assert.Equal(t, graceful.Totals{Succeeded: 1, Failed: 100}, graceful.Totals{Succeeded: st.Totals.Succeeded, Failed: st.Totals.Failed})
	require.Len(t, st.Upgrades, 10)
	assert.Equal(t, graceful.OutcomeSucceeded, st.Upgrades[9].Outcome)
	assert.Equal(t, graceful.OutcomeFailed, st.Upgrades[8].Outcome)
}
