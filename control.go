package graceful

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// This file holds the server side of the control socket
// ([Options.ControlSocket]); the client is package control, and the command
// gracefulctl. The protocol: one request line of at most 256 bytes, its
// newline included, "upgrade", "status" or "status-json"; one answer line,
// "ok <text>" or "error <reason>" (status-json's at most 60 KiB).

// Commands understood by the control socket.
const (
	// controlUpgrade runs [Process.Upgrade] and answers with its outcome
	// once the new process is ready or the attempt has failed. While the
	// previous generation still drains, it first waits for it (at most
	// DrainTimeout and a margin) instead of refusing.
	controlUpgrade = "upgrade"
	// controlStatus answers with the serving process's PID and phase.
	controlStatus = "status"
	// controlStatusJSON answers with [Process.Status] as JSON, on one line.
	controlStatusJSON = "status-json"
)

// controlRequestTimeout bounds how long a peer may take to send its
// one-line request, and controlDrainGrace once this process drains (a
// connection that has not sent its request by then goes to the new
// process's socket next time: it must not hold our exit);
// maxControlRequest bounds its length, newline included.
const (
	controlRequestTimeout = 5 * time.Second
	controlDrainGrace     = 500 * time.Millisecond
	maxControlRequest     = 256
)

// Bounds of the status-json answer, so that every client reads it (those
// before MaxAnswer read 64 KiB): an upgrade's error text is cut to
// maxStatusErr bytes, and the oldest upgrades are left out while the
// answer is longer than maxStatusAnswer.
const (
	maxStatusErr    = 2 << 10
	maxStatusAnswer = 60 << 10
)

// listenControl opens the control socket (inherited across upgrades like
// any listener) and serves it like a ServeConns server: one-line requests,
// answered only to a peer with this process's user ID.
//
// Every generation checks the file at path: a socket whose mode is not
// 0600 (a fresh bind) is given 0600 without following a link
// ([chmodSocket]). Anything but a socket there (a symbolic link put in its
// place by whoever can write to the directory, or nothing) is an error: the
// path no longer leads to the socket, and New fails, so in a new process
// the upgrade fails and the old process serves on; a restart binds afresh
// once the path is cleared.
func (p *Process) listenControl(path string) error {
	ln, err := p.listen("unix", path)
	if err != nil {
		return fmt.Errorf("graceful: control socket %s: %w", path, err)
	}
	if err := chmodSocket(path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("graceful: control socket %s: %w", path, err)
	}
	p.serveConns(p.gate(ln), p.handleControl, true) // the old process answers until a canary is promoted
	return nil
}

func (p *Process) handleControl(ctx context.Context, conn net.Conn) {
	log := p.log.With("control", true)
	reply := func(ok bool, msg string) {
		word := "error "
		if ok {
			word = "ok "
		}
		conn.SetWriteDeadline(time.Now().Add(controlRequestTimeout))
		io.WriteString(conn, word+strings.ReplaceAll(msg, "\n", " ")+"\n")
		if !ok {
			// Closing with unread input would reset the connection and
			// lose the answer: read what the peer still sends, briefly.
			if cw, ok := conn.(interface{ CloseWrite() error }); ok {
				cw.CloseWrite()
			}
			conn.SetReadDeadline(time.Now().Add(time.Second))
			io.Copy(io.Discard, io.LimitReader(conn, 64<<10))
		}
	}
	uid, pid, err := peerCred(conn)
	if err != nil {
		log.Warn("control socket: refused a peer", "err", err)
		reply(false, "graceful: control socket: "+err.Error())
		return
	}
	if owner := os.Geteuid(); uid != owner {
		log.Warn("control socket: refused a peer that is not the owner", "peer_uid", uid, "peer_pid", pid)
		reply(false, fmt.Sprintf("graceful: control socket: permission denied: peer uid %d is not the owner (uid %d)", uid, owner))
		return
	}
	conn.SetReadDeadline(time.Now().Add(controlRequestTimeout))
	// ctx ends at our drain's goodbyes: a peer that has not sent its
	// request by then gets a short grace, not the whole timeout.
	graceOnDrain := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Now().Add(controlDrainGrace)) })
	line, err := bufio.NewReader(io.LimitReader(conn, maxControlRequest+1)).ReadString('\n')
	graceOnDrain()
	if len(line) > maxControlRequest {
		msg := fmt.Sprintf("graceful: control socket: request longer than %d bytes", maxControlRequest)
		log.Warn("control socket: bad request", "peer_pid", pid, "err", msg)
		reply(false, msg)
		return
	}
	if err != nil {
		msg := "graceful: control socket: no request line: " + err.Error()
		if ctx.Err() != nil && len(line) == 0 {
			msg = "graceful: control socket: no request before this process began to drain; connect again"
		}
		log.Warn("control socket: bad request", "peer_pid", pid, "err", msg)
		reply(false, msg)
		return
	}
	conn.SetReadDeadline(time.Time{})
	cmd := strings.TrimSpace(line)
	switch cmd {
	case controlUpgrade:
		log.Info("control socket: upgrade requested", "peer_pid", pid)
		start := time.Now()
		// A reload right after another waits for the previous generation
		// to finish its drain, instead of being refused: the requester
		// waits for an outcome anyway.
		ctx, cancel := context.WithTimeout(context.Background(), p.opts.DrainTimeout+drainMargin) // what its drain may take
		p.awaitPrevious(ctx)
		cancel()
		if err := p.Upgrade(context.Background()); err != nil {
			p.logUpgradeFailure(err)
			reply(false, err.Error())
			return
		}
		took := time.Since(start).Round(time.Millisecond)
		if succ := p.successorPID(); succ != 0 {
			reply(true, fmt.Sprintf("upgraded: pid %d ready after %v; pid %d draining", succ, took, os.Getpid()))
		} else {
			reply(true, fmt.Sprintf("upgraded: new process ready after %v; pid %d draining", took, os.Getpid()))
		}
	case controlStatus:
		reply(true, "pid "+strconv.Itoa(os.Getpid())+" "+p.life.get().String())
	case controlStatusJSON:
		b, err := statusAnswer(p.Status())
		if err != nil {
			reply(false, "graceful: control socket: "+err.Error())
			return
		}
		reply(true, string(b))
	default:
		log.Warn("control socket: unknown command", "peer_pid", pid, "command", strconv.Quote(cmd))
		reply(false, fmt.Sprintf("graceful: control socket: unknown command %q (want %q, %q or %q)", cmd, controlUpgrade, controlStatus, controlStatusJSON))
	}
}

// statusAnswer encodes st for the control socket within maxStatusAnswer:
// each upgrade's error cut to maxStatusErr bytes (saying so), then the
// oldest upgrades left out. The binary's path (PATH_MAX) always fits.
func statusAnswer(st Status) ([]byte, error) {
	st.Upgrades = slices.Clone(st.Upgrades)
	for i, u := range st.Upgrades {
		st.Upgrades[i].Err = shorten(u.Err, maxStatusErr) // from an older generation's record, maybe
	}
	for {
		b, err := json.Marshal(st)
		if err != nil || len(b) <= maxStatusAnswer || len(st.Upgrades) == 0 {
			return b, err
		}
		st.Upgrades = st.Upgrades[1:]
	}
}
