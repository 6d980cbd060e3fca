//go:build linux

package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
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
	"golang.org/x/sys/unix"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// notified is one message received on a test's NOTIFY_SOCKET.
type notified struct {
	pid  int // the sender
	text string
}

// notifySocket is a NOTIFY_SOCKET as a service manager has one: it records
// every message with its sender.
type notifySocket struct {
	path string
	conn *net.UnixConn
	mu   sync.Mutex
	msgs []notified
	more chan struct{} // receives after each message
}

func listenNotify(t *testing.T) *notifySocket {
	t.Helper()
	n := &notifySocket{path: filepath.Join(t.TempDir(), "notify"), more: make(chan struct{}, 1)}
	var err error
	n.conn, err = net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	require.NoError(t, err)
	raw, err := n.conn.SyscallConn()
	require.NoError(t, err)
	raw.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) })
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf, oob := make([]byte, 4096), make([]byte, 1024)
		for {
			k, oobn, _, _, err := n.conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			m := notified{text: string(buf[:k])}
			if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, c := range cmsgs {
					if cred, err := unix.ParseUnixCredentials(&c); err == nil {
						m.pid = int(cred.Pid)
					}
				}
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, m)
			n.mu.Unlock()
			select {
			case n.more <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() {
		n.conn.Close()
		<-done
	})
	return n
}

func (n *notifySocket) all() []notified {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]notified(nil), n.msgs...)
}

// waitFor waits until the messages from index from on contain one with the
// line want, and returns the index after it.
func (n *notifySocket) waitFor(t *testing.T, from int, want string) int {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		msgs := n.all()
		for i := from; i < len(msgs); i++ {
			for line := range strings.SplitSeq(msgs[i].text, "\n") {
				if line == want {
					return i + 1
				}
			}
		}
		select {
		case <-n.more:
		case <-deadline:
			t.Fatalf("no %q on the notify socket; got %+v", want, msgs)
		}
	}
}

// TestSupervise runs the reference server under `gracefulctl supervise`
// as a service manager would: the supervisor's PID is the one the manager
// knows for the service's whole life. Three upgrades (SIGHUP to the
// supervisor) under load lose nothing; the manager hears RELOADING=1 and
// READY=1 for each, never a MAINPID=, always from the supervisor, and the
// last status is the serving generation's own; SIGTERM to the supervisor
// drains the last generation (requests in flight answered) and the
// supervisor exits 0; a server killed by a signal makes it exit 128+N.
func TestSupervise(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	require.NoError(t, loadtest.BecomeSubreaper())
	dir := t.TempDir()
	ctl, err := loadtest.Build(ctx, dir, "github.com/graceful-go/graceful/cmd/gracefulctl", false)
	require.NoError(t, err)
	server, err := loadtest.Build(ctx, dir, "github.com/graceful-go/graceful/examples/httpserver", false)
	require.NoError(t, err)
	ns := listenNotify(t)
	addr, err := loadtest.FreeAddr()
	require.NoError(t, err)
	pidfile := filepath.Join(dir, "server.pid")

	var logs bytes.Buffer
	sup := exec.Command(ctl, "supervise", "--", server, "-addr", addr, "-pidfile", pidfile)
	sup.Env = append(os.Environ(), "NOTIFY_SOCKET="+ns.path)
	sup.Stdout, sup.Stderr = &logs, &logs
	require.NoError(t, sup.Start())
	exited := make(chan int, 1)
	go func() {
		sup.Wait()
		exited <- sup.ProcessState.ExitCode()
	}()
	defer func() {
		sup.Process.Kill()
		if t.Failed() {
			t.Logf("supervisor and server logs:\n%s", logs.String())
		}
	}()
	next := ns.waitFor(t, 0, "READY=1")
	require.NoError(t, loadtest.WaitReady(ctx, addr))
	gens := []int{loadtest.ReadPIDFile(pidfile)}
	assert.NotEqual(t, sup.Process.Pid, gens[0], "the server is a child of the supervisor")

	load := loadtest.StartLoad(addr, loadtest.Mix{KeepAliveGET: 2, KeepAlivePOST: 2, FreshGET: 1, Slow: 1, SSE: 1, WS: 1})
	for i := range 3 {
		require.NoError(t, sup.Process.Signal(syscall.SIGHUP))
		next = ns.waitFor(t, next, "RELOADING=1")
		next = ns.waitFor(t, next, "READY=1")
		var pid int
		for deadline := time.Now().Add(30 * time.Second); pid == 0 || pid == gens[len(gens)-1]; time.Sleep(5 * time.Millisecond) {
			require.False(t, time.Now().After(deadline), "upgrade %d: no new PID", i)
			pid = loadtest.ReadPIDFile(pidfile)
		}
		gens = append(gens, pid)
		for deadline := time.Now().Add(30 * time.Second); loadtest.Alive(gens[len(gens)-2]); time.Sleep(5 * time.Millisecond) {
			require.False(t, time.Now().After(deadline), "upgrade %d: the old generation did not exit", i)
		}
	}
	stats := load.Stop()
	assert.Zero(t, stats.Failed(), "failures: %v %v", stats.Failures, stats.Samples)
	assert.Positive(t, stats.Requests)

	// Requests in flight when the manager stops the service.
	const inFlight = 3
	answers, sent := make(chan int, inFlight), make(chan struct{}, inFlight)
	for range inFlight {
		go func() {
			trace := &httptrace.ClientTrace{WroteRequest: func(httptrace.WroteRequestInfo) { sent <- struct{}{} }}
			req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), http.MethodGet, "http://"+addr+"/slow?ms=1500", nil)
			resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
			if err != nil {
				answers <- 0
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			answers <- resp.StatusCode
		}()
	}
	for range inFlight {
		<-sent // the server has the request
	}
	require.NoError(t, sup.Process.Signal(syscall.SIGTERM))
	select {
	case code := <-exited:
		assert.Equal(t, 0, code, "the supervisor exits with the last generation's status")
	case <-time.After(60 * time.Second):
		t.Fatal("the supervisor did not exit")
	}
	for range inFlight {
		assert.Equal(t, http.StatusOK, <-answers, "a request in flight at the stop was answered")
	}
	last := gens[len(gens)-1]
	assert.False(t, loadtest.Alive(last))

	var statuses []string
	for _, m := range ns.all() {
		assert.Equal(t, sup.Process.Pid, m.pid, "every message comes from the supervisor: %q", m.text)
		assert.NotContains(t, m.text, "MAINPID=", "the supervisor stays the main process")
		for line := range strings.SplitSeq(m.text, "\n") {
			if s, ok := strings.CutPrefix(line, "STATUS="); ok {
				statuses = append(statuses, s)
			}
		}
	}
	require.NotEmpty(t, statuses)
	// The last one before the stop names the serving generation.
	var beforeStop string
	for _, s := range statuses {
		if !strings.HasPrefix(s, "draining") {
			beforeStop = s
		}
	}
	assert.Contains(t, beforeStop, "serving (pid "+strconv.Itoa(last))

	t.Run("server killed", func(t *testing.T) {
		pidfile := filepath.Join(t.TempDir(), "server.pid")
		addr, err := loadtest.FreeAddr()
		require.NoError(t, err)
		sup := exec.Command(ctl, "supervise", server, "-addr", addr, "-pidfile", pidfile)
		require.NoError(t, sup.Start())
		defer sup.Process.Kill()
		require.NoError(t, loadtest.WaitReady(ctx, addr))
		require.NoError(t, syscall.Kill(loadtest.ReadPIDFile(pidfile), syscall.SIGKILL))
		err = sup.Wait()
		assert.Equal(t, 128+9, sup.ProcessState.ExitCode(), "%v", err)
	})
}
