;;; santa.el --- Fill-in-the-middle suggestions from santa -*- lexical-binding: t; -*-

;; Version: 0.1.0
;; Package-Requires: ((emacs "27.1"))
;; Keywords: convenience, tools

;;; Commentary:

;; `santa-complete' sends the buffer split at point to a running `santa serve' (POST /infill
;; through curl) or, when none answers, to `santa infill --json' with a marker that is not in
;; the buffer.  Both run as asynchronous processes, so typing never waits; a reply for a buffer
;; that changed meanwhile is dropped.  The suggestion shows as an overlay at point:
;; TAB accepts it, C-g dismisses it, any other command dismisses it too.
;;
;;   (add-to-list 'load-path "/path/to/santacli/completions/emacs")
;;   (require 'santa)
;;   (setq santa-model "bigcode/tiny_starcoder_py")   ; optional
;;   (add-hook 'prog-mode-hook #'santa-mode)           ; M-\ asks for a suggestion
;;
;; A server started with --api-key gets `santa-api-key' (else $SANTA_API_KEY) as a Bearer token;
;; a server that does not reply within `santa-timeout' seconds (10) is reported, like any other
;; server error.  Only when no server is listening at all does the CLI run instead.

;;; Code:

(require 'json)
(require 'subr-x)

(defgroup santa nil
  "Code suggestions from santa."
  :group 'tools)

(defcustom santa-command "santa" "The santa executable." :type 'string)
(defcustom santa-model nil "Model for the CLI (nil: SANTA_MODEL or santa's default)."
  :type '(choice (const nil) string))
(defcustom santa-args nil "Extra arguments for `santa infill'." :type '(repeat string))
(defcustom santa-server "http://127.0.0.1:8080"
  "URL of `santa serve'; nil to use the CLI only." :type '(choice (const nil) string))
(defcustom santa-api-key nil
  "Key for a server started with --api-key (nil: $SANTA_API_KEY).
Sent as \"Authorization: Bearer KEY\" through a private temporary
file, never on curl's command line."
  :type '(choice (const nil) string))
(defcustom santa-timeout 10
  "Seconds to wait for the server's reply (curl --max-time); nil or 0: no limit."
  :type '(choice (const nil) number))
(defcustom santa-curl "curl" "The curl executable (used to talk to the server)." :type 'string)
(defcustom santa-max-tokens nil "Most tokens to generate (nil: santa's default)."
  :type '(choice (const nil) integer))
(defcustom santa-mode-name nil "Completion mode: auto, line, block or full (nil: auto)."
  :type '(choice (const nil) string))

(defface santa-suggestion-face '((t :inherit shadow)) "Face of the suggestion.")

(defvar santa--request nil "The request in flight: a plist.")
(defvar santa--overlay nil "The overlay showing the suggestion.")
(defvar santa--suggestion nil "The suggestion on screen: (BUFFER POS TEXT).")
(defvar santa--server-down-until 0 "Don't try the server before this time.")
(defvar santa--seq 0)
(defvar santa-last-error nil "The last error message, or nil.")
(defvar santa--header-files nil "Header files of requests in flight (deleted when Emacs exits).")

(defun santa--marker (text)
  "A cursor marker that does not occur in TEXT."
  (let ((n 0) marker)
    (while (progn (setq marker (format "<santa-cursor-%d-%d-%d>" (emacs-pid) santa--seq n))
                  (string-match-p (regexp-quote marker) text))
      (setq n (1+ n)))
    marker))

(defun santa--cli-command (marker path)
  (append (list santa-command "infill" "--json" "--marker" marker)
          (when path (list "--path" path))
          (when santa-model (list "--model" santa-model))
          (when santa-max-tokens (list "--max-tokens" (number-to-string santa-max-tokens)))
          (when santa-mode-name (list "--mode" santa-mode-name))
          santa-args))

(defun santa--run (command input done)
  "Run COMMAND with INPUT on stdin.
Call DONE with (STATUS STDOUT STDERR) when it exits, or soon with
status 127 when it cannot start."
  (let* ((out (generate-new-buffer " *santa-out*"))
         (err (generate-new-buffer " *santa-err*"))
         (err-pipe (make-pipe-process :name "santa-stderr" :buffer err :noquery t
                                      :coding 'utf-8-unix :sentinel #'ignore))
         (proc (condition-case nil
                   (santa--start command out err err-pipe done)
                 (error (delete-process err-pipe)
                        (kill-buffer out)
                        (kill-buffer err)
                        ;; later, as for any other failure: the caller records the process first
                        (run-at-time 0 nil done 127 "" (concat "cannot run " (car command)))
                        nil))))
    (when proc
      (process-send-string proc input)
      (process-send-eof proc))
    proc))

(defun santa--start (command out err err-pipe done)
  "Start COMMAND with stdout to buffer OUT, stderr through ERR-PIPE to buffer ERR.
Call DONE with (STATUS STDOUT STDERR) when it exits."
  (make-process
   :name "santa" :buffer out :command command :connection-type 'pipe
   :coding 'utf-8-unix :noquery t :stderr err-pipe
   :sentinel
   (lambda (p _event)
     (unless (process-live-p p)
       ;; let the stderr pipe drain before reading it
       (accept-process-output err-pipe 0.05)
       (let ((status (process-exit-status p))
             (stdout (with-current-buffer out (buffer-string)))
             (stderr (with-current-buffer err (buffer-string))))
         (delete-process err-pipe)
         (kill-buffer out)
         (kill-buffer err)
         (funcall done status stdout stderr))))))

(defun santa--report (message)
  (setq santa-last-error message)
  (message "%s" message))

(defun santa--on-reply (request body)
  (setq santa--request nil)
  (let* ((reply (condition-case nil
                    (json-parse-string body :object-type 'alist :null-object nil)
                  (error nil)))
         (text (alist-get 'completion reply))
         (buffer (plist-get request :buffer)))
    (cond
     ((not (stringp text))
      (santa--report (concat "santa: unexpected reply: " (truncate-string-to-width body 200))))
     ;; the user moved on: the suggestion is for text that is no longer there
     ((not (and (eq (current-buffer) buffer)
                (= (buffer-chars-modified-tick) (plist-get request :tick))
                (= (point) (plist-get request :point)))))
     (t
      (setq santa-last-error nil)
      (santa--show buffer (plist-get request :point) text)))))

(defun santa--via-cli (request)
  (let* ((prefix (plist-get request :prefix))
         (suffix (plist-get request :suffix))
         (marker (santa--marker (concat prefix suffix))))
    (plist-put request :via 'cli)
    (plist-put request :process
               (santa--run (santa--cli-command marker (plist-get request :path))
                           (concat prefix marker suffix)
                           (lambda (status stdout stderr)
                             (when (eq request santa--request)
                               (if (= status 0)
                                   (santa--on-reply request stdout)
                                 (setq santa--request nil)
                                 (let ((line (string-trim (car (split-string stderr "\n")))))
                                   (santa--report (if (string-prefix-p "santa:" line) line
                                                    (format "santa: %s (exit %d)" line status)))))))))))

;; The key never goes on curl's command line: any user on the machine can read that (ps,
;; /proc/PID/cmdline).  stdin is taken by the JSON body, and a curl config on stdin (`-K -')
;; cannot carry the body as well (curl caps a config line at 100 KB, less than a source file
;; can be).  So the header goes into a file that `make-temp-file' creates with mode 0600, is
;; handed to curl as `-H @FILE', and is deleted as soon as curl exits (or Emacs does).
(defun santa--api-key ()
  "The API key to send: `santa-api-key', else $SANTA_API_KEY; nil for none."
  (let ((key (string-trim (or (and santa-api-key (not (string-empty-p santa-api-key)) santa-api-key)
                              (getenv "SANTA_API_KEY")
                              ""))))
    (unless (string-empty-p key) key)))

(defun santa--header-file (key)
  "A new file (mode 0600) holding the Authorization header for KEY."
  (let* ((coding-system-for-write 'utf-8-unix)
         (file (make-temp-file "santa-" nil nil (concat "Authorization: Bearer " key "\n"))))
    (push file santa--header-files)
    file))

(defun santa--delete-header-files (&optional file)
  "Delete the header FILE, or every one left (when Emacs exits)."
  (dolist (f (if file (list file) santa--header-files))
    (ignore-errors (delete-file f))
    (setq santa--header-files (delete f santa--header-files))))

(add-hook 'kill-emacs-hook #'santa--delete-header-files)

(defun santa--timeout ()
  "`santa-timeout' as curl's --max-time wants it, or nil for no limit."
  (when (and (numberp santa-timeout) (> santa-timeout 0))
    (number-to-string santa-timeout)))

(defun santa--via-server (request url)
  (let* ((body (json-encode `((prefix . ,(plist-get request :prefix))
                              (suffix . ,(plist-get request :suffix))
                              (path . ,(plist-get request :path))
                              ,@(when santa-max-tokens `((max_tokens . ,santa-max-tokens)))
                              ,@(when santa-mode-name `((mode . ,santa-mode-name))))))
         (seconds (santa--timeout))
         (key (santa--api-key))
         (header-file (and key (condition-case nil (santa--header-file key) (error 'failed)))))
    (if (eq header-file 'failed)
        (progn (setq santa--request nil)
               (santa--report "santa: cannot write a temporary file for the API key"))
      (plist-put request :via 'server)
      (plist-put request :process
                 ;; No --fail: an HTTP error has a body worth showing.  The last line of the output
                 ;; is the HTTP status and whether a connection was made at all (0: no server there).
                 (santa--run (append (list santa-curl "-sS" "--connect-timeout" "1"
                                           "-w" "\n%{http_code} %{num_connects}"
                                           "-H" "Content-Type: application/json" "--data-binary" "@-")
                                     ;; a stalled server must not keep a request running forever
                                     (when seconds (list "--max-time" seconds))
                                     (when header-file (list "-H" (concat "@" header-file)))
                                     (list (concat (string-remove-suffix "/" url) "/infill")))
                             body
                             (lambda (status stdout stderr)
                               (when header-file (santa--delete-header-files header-file))
                               (when (eq request santa--request)
                                 (santa--on-server request status stdout stderr seconds))))))))

(defun santa--on-server (request status stdout stderr seconds)
  "Handle curl's exit STATUS, STDOUT and STDERR for REQUEST.
SECONDS is its --max-time, or nil."
  (let* ((tail (string-match "\n\\([0-9][0-9][0-9]\\) \\([0-9]+\\)[ \t\n]*\\'" stdout))
         (reply (and tail (substring stdout 0 tail)))
         (code (and tail (match-string 1 stdout)))
         (connects (and tail (match-string 2 stdout))))
    (cond
     ((and (/= status 0) (member connects '(nil "0")))
      ;; no server: use the CLI, and skip the server for a while
      (setq santa--server-down-until (+ (float-time) 30))
      (santa--via-cli request))
     ((and (= status 0) (equal code "200"))
      (santa--on-reply request reply))
     (t
      ;; The server is there but failed us: an error status (busy, bad request, wrong key), no
      ;; reply in time, a dropped connection.  Say so: it is not down, and the CLI would load a
      ;; second copy of the model.
      (setq santa--request nil)
      (santa--report
       (concat "santa: server: "
               (cond
                ((= status 28) (format "no reply within %s s (santa-timeout)" (or seconds "?")))
                ((/= status 0)
                 (let ((line (replace-regexp-in-string
                              "\\`curl: ([0-9]+) " ""
                              (string-trim (car (split-string stderr "\n"))))))
                   (if (string-empty-p line) (format "curl exit status %d" status) line)))
                ((not code) (concat "unexpected reply: " (truncate-string-to-width stdout 200)))
                (t (concat (santa--server-error reply code)
                           (when (equal code "401") " (set santa-api-key or $SANTA_API_KEY)"))))))))))

(defun santa--server-error (body code)
  "The message of a server's JSON error BODY, else \"HTTP CODE\".
BODY has santa's, OpenAI's or TGI's error shape."
  (let* ((reply (condition-case nil
                    (json-parse-string body :object-type 'alist :null-object nil)
                  (error nil)))
         (err (and (consp reply) (alist-get 'error reply))))
    (cond ((and (consp err) (stringp (alist-get 'message err))) (alist-get 'message err))
          ((and (stringp err) (not (string-empty-p err))) err)
          (t (concat "HTTP " code)))))

;;;###autoload
(defun santa-complete ()
  "Ask santa for a suggestion at point."
  (interactive)
  (santa-dismiss)
  (when-let ((proc (plist-get santa--request :process)))
    ;; forget it first: deleting the process runs its sentinel, which must see a stale request
    (setq santa--request nil)
    (when (process-live-p proc) (delete-process proc)))
  (setq santa--seq (1+ santa--seq))
  (let ((request (list :buffer (current-buffer) :point (point) :tick (buffer-chars-modified-tick)
                       :prefix (buffer-substring-no-properties (point-min) (point))
                       :suffix (buffer-substring-no-properties (point) (point-max))
                       :path (and buffer-file-name (file-name-nondirectory buffer-file-name)))))
    (setq santa--request request)
    (if (and santa-server (>= (float-time) santa--server-down-until))
        (santa--via-server request santa-server)
      (santa--via-cli request))))

(defvar santa-preview-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "TAB") #'santa-accept)
    (define-key map (kbd "<tab>") #'santa-accept)
    (define-key map (kbd "C-g") #'santa-dismiss)
    map)
  "Keys active while a suggestion is shown.")

(defun santa--show (buffer pos text)
  (setq santa--suggestion (list buffer pos text))
  (unless (string-empty-p text)
    (with-current-buffer buffer
      (setq santa--overlay (make-overlay pos pos buffer))
      ;; the cursor stays before the preview, not after it
      (overlay-put santa--overlay 'after-string
                   (propertize text 'face 'santa-suggestion-face 'cursor 0))
      (set-transient-map santa-preview-map nil #'santa--maybe-dismiss))))

(defun santa--maybe-dismiss ()
  "Leaving the preview keys without accepting dismisses the suggestion."
  (unless (memq this-command '(santa-accept))
    (santa-dismiss)))

(defun santa-visible-p ()
  "Non-nil while a non-empty suggestion is shown."
  (and santa--suggestion (not (string-empty-p (nth 2 santa--suggestion)))))

(defun santa-state ()
  "`running', `shown', `empty' (the model had nothing) or `idle'."
  (cond (santa--request 'running) ((santa-visible-p) 'shown) (santa--suggestion 'empty) (t 'idle)))

(defun santa-suggestion ()
  "The text of the suggestion on screen, or nil."
  (nth 2 santa--suggestion))

(defun santa-accept ()
  "Insert the suggestion where it was requested and move point after it."
  (interactive)
  (when (santa-visible-p)
    (pcase-let ((`(,buffer ,pos ,text) santa--suggestion))
      (santa-dismiss)
      (with-current-buffer buffer
        (goto-char pos)
        (insert text)))))

(defun santa-dismiss ()
  "Remove the suggestion."
  (interactive)
  (when santa--overlay (delete-overlay santa--overlay))
  (setq santa--overlay nil santa--suggestion nil))

(defvar santa-mode-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "M-\\") #'santa-complete)
    map)
  "Keys of `santa-mode'.")

;;;###autoload
(define-minor-mode santa-mode
  "Code suggestions from santa: \\[santa-complete] asks, TAB accepts, C-g dismisses."
  :lighter " santa"
  :keymap santa-mode-map)

(provide 'santa)
;;; santa.el ends here
